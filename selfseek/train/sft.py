"""Supervised fine-tuning on chat JSONL: the checkpoint's chat template, loss on assistant tokens only,
full fine-tuning or LoRA. Conversations are right-padded per micro-batch (no packing across samples).

Outputs under out_dir: checkpoints/, metrics.jsonl, loss.png, final/ (merged Hugging Face-format model)
and, with LoRA, adapter/ (the adapter alone, loadable with lora.load_adapter onto the base).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from selfseek.tokenizer import Tokenizer
from selfseek.train.build import load_trainable, set_threads
from selfseek.train.config import SFTConfig, TrainConfigError, to_dict
from selfseek.train.data import ChatExamples, read_chat_jsonl, split_holdout
from selfseek.train.dist import DistContext, init_distributed
from selfseek.train.export import export_hf, read_config
from selfseek.train.lora import apply_lora, merge_lora, save_adapter
from selfseek.train.trainer import Trainer


def load_base_tokenizer(base: str) -> Tokenizer:
    if not base:
        raise TrainConfigError("base: set it to a Hugging Face-format model folder (e.g. a pretrain run's final/)")
    path = Path(base)
    if not (path / "config.json").is_file():
        raise TrainConfigError(f"base {base!r}: not a model folder (no config.json)")
    if not (path / "tokenizer.json").is_file():
        raise TrainConfigError(f"base {base!r}: no tokenizer.json next to the model")
    tok = Tokenizer.from_dir(path)
    if not tok.chat_template:
        raise TrainConfigError(f"base {base!r}: its tokenizer has no chat template")
    return tok


def setup_sft(cfg: SFTConfig, ctx: DistContext | None = None) -> Trainer:
    set_threads(cfg.threads)
    ctx = ctx or init_distributed(cfg.device)
    tok = load_base_tokenizer(cfg.base)
    if not cfg.data.train:
        raise TrainConfigError("data.train: list the chat JSONL files to fine-tune on")
    convs = read_chat_jsonl(cfg.data.train)
    if cfg.data.valid:
        train_convs, valid_convs = convs, read_chat_jsonl(cfg.data.valid)
    else:
        train_convs, valid_convs = split_holdout(convs, cfg.data.valid_fraction, cfg.seed,
                                                 key=lambda c: json.dumps(c, sort_keys=True))
    train_set = ChatExamples(train_convs, tok, cfg.data.max_len)
    valid_set = ChatExamples(valid_convs, tok, cfg.data.max_len) if valid_convs else None

    model = load_trainable(cfg.base, ctx.device)
    if cfg.lora.r > 0:
        apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.targets)
    model_dict = read_config(cfg.base)
    if model_dict.get("model_type") == "deepseek_v3":
        model_dict["num_nextn_predict_layers"] = len(model.mtp)
    out = Path(cfg.out_dir)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")

    def export(m, path: Path) -> None:
        if cfg.lora.r > 0:
            save_adapter(m, out / "adapter", cfg.lora.targets, base=str(cfg.base))
            m = merge_lora(copy.deepcopy(m))
        export_hf(m, model_dict, path, cfg.base)

    pad = tok.token_to_id(tok.pad_token) if tok.pad_token else None
    return Trainer(
        model=model, loop=cfg.train, optim=cfg.optim, train_data=train_set, valid_data=valid_set,
        pad_id=pad if pad is not None else tok.eos_id, seed=cfg.seed, out_dir=out, ctx=ctx, export=export,
        job_config={"job": "sft", "config": to_dict(cfg), "model_config": model_dict, "tokenizer": str(cfg.base)},
    )


def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    trainer = setup_sft(cfg)
    if trainer.ctx.is_main:
        n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        print(f"sft: {len(trainer.train_data)} training conversations, "
              f"{0 if trainer.valid_data is None else len(trainer.valid_data)} validation, "
              f"{n_train / 1e6:.3f}M trainable parameters{' (LoRA)' if cfg.lora.r else ''}")
    try:
        return trainer.run()
    finally:
        trainer.ctx.close()
