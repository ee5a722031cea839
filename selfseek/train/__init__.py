"""Training small DeepSeek-style models: pretraining (MLA, DeepSeekMoE with aux-loss-free balancing, MTP,
FIM), SFT and LoRA on chat data, GRPO on a verifiable task, and export to Hugging Face-format folders.

Entry points: `selfseek train ...` / `python -m selfseek.train ...` (see cli.py). Each file has one job:
config (job configs), tokenizer_train, data, build (model construction), losses, balance (expert load
balancing), optim, dist (torch.distributed), checkpoint (exact resume), trainer (the supervised loop),
pretrain, sft, lora, tasks (verifiable tasks), grpo, export, plots.
"""
