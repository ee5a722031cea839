"""Pretraining a DeepSeek-V3-shaped model from scratch: tokenizer, packed FIM corpus, the Trainer loop.

Objective per step: L_main + lambda * L_MTP + alpha * sum over MoE layers of L_Bal, plus the aux-loss-free
bias update after each optimizer step (see balance.py, losses.py).
Outputs under out_dir: tokenizer/, data/ (token stream cache), checkpoints/, metrics.jsonl, *.png and,
when the run completes, final/ (the Hugging Face-format model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from selfseek.tokenizer import Tokenizer
from selfseek.train.build import model_config_dict, new_model, parse_model_config, set_threads
from selfseek.train.config import PretrainConfig, TrainConfigError, to_dict
from selfseek.train.data import PackedBlocks, encode_documents, read_documents, split_holdout, stream_cache_key
from selfseek.train.dist import DistContext, init_distributed
from selfseek.train.export import export_hf
from selfseek.train.tokenizer_train import build_tokenizer_folder
from selfseek.train.trainer import Trainer


def _texts(docs, max_bytes: int):
    total = 0
    for d in docs:
        if total >= max_bytes:
            return
        total += len(d.text)
        yield d.text


def _cached_stream(path: Path, build, ctx: DistContext) -> np.ndarray:
    """Build the token stream on rank 0 once (it is cached on disk), then every rank maps it."""
    if ctx.is_main and not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, build())
        tmp.replace(path)
    ctx.barrier()
    return np.load(path, mmap_mode="r")


def setup_pretrain(cfg: PretrainConfig, ctx: DistContext | None = None) -> Trainer:
    """Everything up to the first step; `Trainer.run()` trains. The model is `trainer.model`."""
    set_threads(cfg.threads)
    ctx = ctx or init_distributed(cfg.device)
    out = Path(cfg.out_dir)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    data = cfg.data
    if data.seq_len < 2:
        raise TrainConfigError(f"data.seq_len must be at least 2, got {data.seq_len}")
    docs = read_documents(data.train, data.extensions, data.text_key, data.max_docs)
    if data.valid:
        train_docs, valid_docs = docs, read_documents(data.valid, data.extensions, data.text_key)
    else:
        train_docs, valid_docs = split_holdout(docs, data.valid_fraction, cfg.seed)

    tok_dir = Path(cfg.tokenizer.path) if cfg.tokenizer.path else out / "tokenizer"
    if cfg.tokenizer.path and not (tok_dir / "tokenizer.json").is_file():
        raise TrainConfigError(f"tokenizer.path {cfg.tokenizer.path!r}: no tokenizer.json there")
    # A tokenizer trained by an earlier run in out_dir is reused when trained with the same settings.
    marker = tok_dir / "selfseek_train.json"
    wanted = {"vocab_size": cfg.tokenizer.vocab_size, "max_bytes": cfg.tokenizer.max_bytes, "train": data.train}
    fresh = not marker.is_file() or json.loads(marker.read_text()) != wanted
    if not cfg.tokenizer.path and fresh and ctx.is_main:
        build_tokenizer_folder(_texts(train_docs, cfg.tokenizer.max_bytes), cfg.tokenizer.vocab_size, tok_dir,
                               model_max_length=cfg.model.get("max_position_embeddings", 2048))
        marker.write_text(json.dumps(wanted) + "\n")
    ctx.barrier()
    tok = Tokenizer.from_dir(tok_dir)
    raw = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))

    key = stream_cache_key(train_docs, tok_dir / "tokenizer.json", data.fim_rate, cfg.seed)
    train_stream = _cached_stream(
        out / "data" / f"train-{key}.npy",
        lambda: encode_documents(train_docs, raw, data.fim_rate, cfg.seed, tok.bos_id, tok.eos_id), ctx,
    )
    train_set = PackedBlocks(train_stream, data.seq_len, name=f"training corpus {data.train}")
    valid_set = None
    if valid_docs:  # validation measures plain next-token loss: no FIM rewriting
        vkey = stream_cache_key(valid_docs, tok_dir / "tokenizer.json", 0.0, cfg.seed)
        valid_stream = _cached_stream(
            out / "data" / f"valid-{vkey}.npy",
            lambda: encode_documents(valid_docs, raw, 0.0, cfg.seed, tok.bos_id, tok.eos_id), ctx,
        )
        if len(valid_stream) > data.seq_len:
            valid_set = PackedBlocks(valid_stream, data.seq_len, name="validation corpus")

    model_dict = model_config_dict(cfg.model, tok.vocab_size, tok.bos_id, tok.eos_id)
    mcfg = parse_model_config(model_dict)
    if mcfg.max_position_embeddings < data.seq_len:
        raise TrainConfigError(
            f"data.seq_len {data.seq_len} exceeds model.max_position_embeddings {mcfg.max_position_embeddings}"
        )
    model = new_model(mcfg, cfg.train.init_std, cfg.seed).to(ctx.device)

    def export(m, path: Path) -> None:
        export_hf(m, model_dict, path, tok_dir)

    return Trainer(
        model=model, loop=cfg.train, optim=cfg.optim, train_data=train_set, valid_data=valid_set,
        pad_id=tok.eos_id, seed=cfg.seed, out_dir=out, ctx=ctx, export=export,
        job_config={"job": "pretrain", "config": to_dict(cfg), "model_config": model_dict, "tokenizer": str(tok_dir)},
    )


def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    trainer = setup_pretrain(cfg)
    if trainer.ctx.is_main:
        n = sum(p.numel() for p in trainer.model.parameters())
        print(f"pretrain: {n / 1e6:.2f}M parameters, {len(trainer.train_data)} training sequences of "
              f"{cfg.data.seq_len} tokens ({len(trainer.train_data) * cfg.data.seq_len / 1e6:.2f}M tokens), "
              f"{0 if trainer.valid_data is None else len(trainer.valid_data)} validation sequences, "
              f"{trainer.ctx.world} process(es) on {trainer.ctx.device}")
    try:
        return trainer.run()
    finally:
        trainer.ctx.close()
