"""Supervised fine-tuning on chat JSONL: the base model's own chat template, loss on assistant tokens only (R1
`<think>` reasoning kept or dropped), full fine-tuning, LoRA or QLoRA (a frozen int4/int8 base), optionally packed
(a micro-batch's conversations in one unpadded row, each attending only to itself).

The base is loaded as `serve` loads it (selfseek/stores.py): a Hugging Face folder, a .gguf, a hub-cache id or an
Ollama name. Outputs under out_dir: checkpoints/, metrics.jsonl, loss.png; at the end final/ (the merged model,
Hugging Face format, when the base is a folder with config.json), final.{type}.gguf for each `gguf` type, and with
LoRA adapter/ (peft format: loads with `peft` on transformers and with `lora.load_adapter` here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selfseek.models.model import CausalLM
from selfseek.tokenizer import Tokenizer
from selfseek.train.build import make_trainable, set_threads
from selfseek.train.config import SFTConfig, TrainConfigError, to_dict
from selfseek.train.data import ChatExamples, read_chat_jsonl, split_holdout
from selfseek.train.dist import DistContext, init_distributed
from selfseek.train.export import (
    GGUF_TYPES,
    dequantize_model,
    export_gguf,
    export_hf,
    read_config,
    tokenizer_metadata_of,
)
from selfseek.train.lora import apply_lora, merged_copy, save_adapter
from selfseek.train.trainer import Trainer


def load_base(base: str, device, quantize: int = 0) -> tuple[CausalLM, Tokenizer, Path]:
    """The base model (fp32 compute; with `quantize` 4 or 8 its linear layers and experts kept in int4 / int8
    blocks), its tokenizer (which must have a chat template) and the path it resolved to."""
    from selfseek.config import ConfigError
    from selfseek.stores import resolve
    from selfseek.weights import CheckpointError, load_model

    if not base:
        raise TrainConfigError("base: set it to a model: a folder, a .gguf file, a hub-cache id or an Ollama name")
    if quantize not in (0, 4, 8):
        raise TrainConfigError(f"lora.quantize must be 0, 4 or 8, not {quantize}")
    try:
        path = resolve(base).path
        model, tok = load_model(base, "float32", device, progress=False, quantize=quantize,
                                generation_config="none")
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        raise TrainConfigError(f"base {base!r}: {e}") from None
    if tok is None:
        raise TrainConfigError(f"base {base!r}: no tokenizer beside the model")
    if not tok.chat_template:
        raise TrainConfigError(f"base {base!r}: its tokenizer has no chat template")
    return model, tok, path


def load_base_tokenizer(base: str) -> Tokenizer:
    """The tokenizer of a base folder (kept for callers that only need the tokenizer)."""
    path = Path(base)
    if not (path / "tokenizer.json").is_file():
        raise TrainConfigError(f"base {base!r}: no tokenizer.json next to the model")
    tok = Tokenizer.from_dir(path)
    if not tok.chat_template:
        raise TrainConfigError(f"base {base!r}: its tokenizer has no chat template")
    return tok


def setup_sft(cfg: SFTConfig, ctx: DistContext | None = None) -> Trainer:
    set_threads(cfg.threads)
    ctx = ctx or init_distributed(cfg.device)
    if not cfg.data.train:
        raise TrainConfigError("data.train: list the chat JSONL files to fine-tune on")
    lora = cfg.lora
    if lora.quantize and lora.r <= 0:
        raise TrainConfigError("lora.quantize (QLoRA) needs adapters: set lora.r > 0")
    if cfg.data.pack and (cfg.train.mtp_weight > 0 or cfg.train.seq_aux_alpha > 0):
        raise TrainConfigError("data.pack: set train.mtp_weight=0 and train.seq_aux_alpha=0 (both are per sequence)")
    bad = [t for t in cfg.gguf if t not in GGUF_TYPES]
    if bad:
        raise TrainConfigError(f"gguf: unknown type {bad[0]!r}; choose from {', '.join(GGUF_TYPES)}")
    model, tok, base_path = load_base(cfg.base, ctx.device, lora.quantize)

    convs = read_chat_jsonl(cfg.data.train)
    if cfg.data.valid:
        train_convs, valid_convs = convs, read_chat_jsonl(cfg.data.valid)
    else:
        train_convs, valid_convs = split_holdout(convs, cfg.data.valid_fraction, cfg.seed,
                                                 key=lambda c: json.dumps(c, sort_keys=True))
    d = cfg.data
    train_set = ChatExamples(train_convs, tok, d.max_len, d.think, d.pack)
    valid_set = ChatExamples(valid_convs, tok, d.max_len, d.think) if valid_convs else None

    model.train()
    if lora.r > 0:
        apply_lora(model, lora.r, lora.alpha, lora.targets, experts=lora.experts, train_router=lora.train_router)
    else:
        make_trainable(model)
    model_dict = read_config(base_path) if (base_path / "config.json").is_file() else None
    if model_dict is not None and model_dict.get("model_type") in ("deepseek_v3", "deepseek_v32"):
        model_dict["num_nextn_predict_layers"] = len(model.mtp)
    out = Path(cfg.out_dir)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")

    def export(m: CausalLM, path: Path) -> None:
        if lora.r > 0:
            save_adapter(m, out / "adapter", base=str(cfg.base))
            m = merged_copy(m)
        dequantize_model(m)
        if model_dict is not None:
            export_hf(m, model_dict, path, base_path)
        if cfg.gguf:
            meta = tokenizer_metadata_of(base_path, m.config.model_type, m.config.vocab_size)
            for t in cfg.gguf:
                export_gguf(m, out / f"final.{t}.gguf", t, meta)

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
        kind = f" (LoRA{f', base in int{cfg.lora.quantize}' if cfg.lora.quantize else ''})" if cfg.lora.r else ""
        print(f"sft: {len(trainer.train_data)} training conversations, "
              f"{0 if trainer.valid_data is None else len(trainer.valid_data)} validation, "
              f"{n_train / 1e6:.3f}M trainable parameters{kind}")
    try:
        return trainer.run()
    finally:
        trainer.ctx.close()
