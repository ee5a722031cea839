"""CausalLM -> .gguf, with the tensor names and metadata llama.cpp's converter (convert_hf_to_gguf.py) writes.

For tests and benchmarks: a tiny or random model written here loads in llama.cpp and in selfseek's GGUF
loader alike. Architectures `llama` (Llama 3 RoPE scaling as a `rope_freqs.weight` tensor), `qwen2`, `qwen3`
and `deepseek2` (V2 / V3 shapes; the MTP layer is dropped, as the converter does). Quantization follows the
converter's rules: 1-D tensors, norms, the router and biases stay F32; a tensor whose rows are not whole
blocks falls back to F16. Q4_K (which the `gguf` package cannot quantize) is quantized here, quantize_q4_k(); as
llama.cpp's quantizer, a tensor whose rows are not whole 256-value super-blocks falls back to Q5_0 (then F16).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_VERSION,
    ExpertGatingFuncType,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    QuantError,
    RopeScalingType,
    TokenType,
)
from gguf.quants import quantize

from selfseek.config import ModelConfig
from selfseek.models.model import CausalLM

__all__ = ["gguf_tokenizer_metadata", "quantize_q4_k", "write_gguf"]

T = GGMLQuantizationType
_FILE_TYPE = {T.F32: LlamaFileType.ALL_F32, T.F16: LlamaFileType.MOSTLY_F16, T.BF16: LlamaFileType.MOSTLY_BF16,
              T.Q8_0: LlamaFileType.MOSTLY_Q8_0, T.Q4_0: LlamaFileType.MOSTLY_Q4_0,
              T.Q4_1: LlamaFileType.MOSTLY_Q4_1, T.Q5_0: LlamaFileType.MOSTLY_Q5_0, T.Q5_1: LlamaFileType.MOSTLY_Q5_1,
              T.Q4_K: LlamaFileType.MOSTLY_Q4_K_S}  # Q4_K everywhere (no Q6_K / Q5_K mix): llama.cpp's Q4_K_S label
_LAYER = {  # our name under model.layers.{i}. -> llama.cpp's under blk.{i}.
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.kv_b_proj.weight": "attn_kv_b.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.experts.gate_proj": "ffn_gate_exps.weight",
    "mlp.experts.up_proj": "ffn_up_exps.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def write_gguf(
    path: str | Path,
    model: CausalLM,
    qtype: GGMLQuantizationType = T.F32,
    *,
    split_kv_b: bool = True,
    q_lora_rank_zero: bool = False,
    metadata: Mapping[str, Any] | None = None,
    name: str = "selfseek",
    split_max_tensors: int = 0,
) -> None:
    """Write `model` (with float weights) as llama.cpp's converter would (outtype `qtype`).

    split_kv_b: write kv_b_proj as attn_k_b / attn_v_b with the `*_length_mla` keys (converters since
    llama.cpp's MLA change); False writes the older single attn_kv_b with per-head key/value_length.
    q_lora_rank_zero: also write `attention.q_lora_rank = 0` for a model without q compression (the
    converter writes nothing; llama.cpp then needs it unless the model has V2-Lite's 26/27 layers).
    metadata: more keys to write, e.g. the `tokenizer.*` ones from gguf_tokenizer_metadata().
    split_max_tensors: write a split GGUF (`NAME-00001-of-0000n.gguf`, as llama-gguf-split) of at most this many
    tensors per file.
    """
    cfg = model.config
    if cfg.has_indexer:  # llama.cpp's deepseek2 architecture has no sparse-attention indexer to hold it
        raise ValueError(f"GGUF export does not support {cfg.model_type} (its DSA indexer has no GGUF layout)")
    arch = "deepseek2" if cfg.is_mla else cfg.model_type
    w = GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_name(name)
    _write_config(w, cfg, qtype, split_kv_b, q_lora_rank_zero)
    w.add_quantization_version(GGML_QUANT_VERSION)
    for key, value in (metadata or {}).items():
        _add_kv(w, key, value)
    for our, t in model.named_parameters():  # a tied lm_head is not listed a second time
        if our.startswith("mtp."):
            continue
        for gguf_name, data in _file_tensors(our, t.detach().float().cpu().numpy(), cfg, split_kv_b):
            _add_tensor(w, gguf_name, data, qtype)
    if cfg.rope.type == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_config(w: GGUFWriter, cfg: ModelConfig, qtype, split_kv_b: bool, q_lora_zero: bool) -> None:
    # The order and the conditions of TextModel / LlamaModel / DeepseekV2Model.set_gguf_parameters.
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1 if cfg.is_mla else cfg.num_key_value_heads)  # MLA is written as MQA
    r = cfg.rope
    if r.type == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(r.factor)
    elif r.type == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(r.factor)
        w.add_rope_scaling_orig_ctx_len(r.original_max_position_embeddings)
        if r.attention_factor is not None:
            w.add_rope_scaling_yarn_attn_factor(r.attention_factor)
        w.add_rope_scaling_yarn_beta_fast(r.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(r.beta_slow)
    elif r.type not in ("default", "llama3"):  # llama3: the rope_freqs.weight tensor, no keys
        raise ValueError(f"writing RoPE type {r.type!r} to GGUF is not supported")
    w.add_rope_freq_base(r.theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.is_mla and cfg.n_routed_experts:
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
        gating = ExpertGatingFuncType.SOFTMAX if cfg.scoring_func == "softmax" else ExpertGatingFuncType.SIGMOID
        w.add_expert_gating_func(gating)
    if not cfg.is_mla:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_file_type(_FILE_TYPE[qtype])
    w.add_vocab_size(cfg.vocab_size)
    if not cfg.is_mla:
        w.add_rope_dimension_count(cfg.head_dim)
        return
    w.add_leading_dense_block_count(cfg.first_k_dense_replace if cfg.n_routed_experts else cfg.num_hidden_layers)
    if cfg.q_lora_rank is not None or q_lora_zero:
        w.add_q_lora_rank(cfg.q_lora_rank or 0)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    if split_kv_b:
        w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        w.add_value_length(cfg.kv_lora_rank)
        w.add_key_length_mla(cfg.qk_head_dim)
        w.add_value_length_mla(cfg.v_head_dim)
    else:  # before the split, the per-head sizes went into key/value_length
        w.add_key_length(cfg.qk_head_dim)
        w.add_value_length(cfg.v_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size or cfg.intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    if cfg.norm_topk_prob:
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    if r.type == "yarn" and r.mscale_all_dim is not None:
        w.add_rope_scaling_yarn_log_mul(0.1 * r.mscale_all_dim)


def llama3_rope_factors(cfg: ModelConfig) -> np.ndarray:
    """Llama 3.1's RoPE scaling as the converter's `rope_freqs.weight`: per rotary frequency, the divisor
    (1 for short wavelengths, `factor` for long ones, a smooth blend between), float32 [head_dim / 2]."""
    r, dim = cfg.rope, cfg.head_dim
    freqs = 1.0 / (r.theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    orig = r.original_max_position_embeddings
    low_wavelen, high_wavelen = orig / r.low_freq_factor, orig / r.high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(r.factor)
        else:
            smooth = (orig / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
            out.append(1 / ((1 - smooth) / r.factor + smooth))
    return np.array(out, dtype=np.float32)


def _file_tensors(our: str, a: np.ndarray, cfg: ModelConfig, split_kv_b: bool):
    if our in _GLOBAL:
        yield _GLOBAL[our], a
        return
    _, _, layer, rest = our.split(".", 3)
    name = f"blk.{layer}.{_LAYER[rest]}"
    # Only llama's q/k are permuted: llama.cpp runs qwen2/qwen3 with rotate-half ("NEOX") RoPE as HF does.
    if cfg.model_type == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
        heads = cfg.num_attention_heads if "q_proj" in rest else cfg.num_key_value_heads
        # LlamaModel.permute: rotate-half row order -> interleaved pairs, which llama.cpp's RoPE rotates
        yield name, a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
    elif rest == "self_attn.kv_b_proj.weight" and split_kv_b:
        h, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim
        kv_b = a.reshape(h, nope + cfg.v_head_dim, a.shape[-1])
        yield f"blk.{layer}.attn_k_b.weight", np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1))
        yield f"blk.{layer}.attn_v_b.weight", np.ascontiguousarray(kv_b[:, nope:])
    else:
        yield name, a


def _add_tensor(w: GGUFWriter, name: str, a: np.ndarray, qtype: GGMLQuantizationType) -> None:
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim <= 1 or name.endswith(("_norm.weight", "ffn_gate_inp.weight")) or not name.endswith(".weight"):
        qtype = T.F32
    if qtype == T.F32:
        w.add_tensor(name, a)
        return
    if qtype == T.Q4_K:
        if a.shape[-1] % QK_K == 0:
            w.add_tensor(name, quantize_q4_k(a), raw_dtype=qtype)
            return
        qtype = T.Q5_0  # llama.cpp's fallback for Q4_K rows that are not whole super-blocks
    try:
        data = quantize(a, qtype)
    except QuantError:  # rows that are not whole blocks (e.g. a 16-wide attn_k_b): F16, as the converter
        qtype, data = T.F16, quantize(a, T.F16)
    w.add_tensor(name, data, raw_dtype=qtype)


# ---------------------------------------------------------------- Q4_K

QK_K = 256  # values per Q4_K super-block: 8 sub-blocks of 32
Q4_K_BLOCK_BYTES = 144  # fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit values
_LEVELS = np.arange(140, 161, dtype=np.float32) / 10  # candidate spans of a sub-block's range, in quantization steps
_CHUNK = 4096  # super-blocks per pass: the [candidates, values] temporaries stay under ~90 MB


def quantize_q4_k(a: np.ndarray) -> np.ndarray:
    """float [..., n * 256] -> Q4_K blocks, uint8 [..., n * 144], the layout GGUF (ggml's block_q4_K) defines.

    A value decodes as d * sc[j] * q - dmin * mn[j]: q in 0..15, per 32-value sub-block j a 6-bit scale sc[j] and
    min mn[j], per super-block fp16 d and dmin. The method, per sub-block: take the grid whose lowest level is
    min(x.min(), 0) (the offset must be <= 0: mn is unsigned) and try steps range / L for L in 14.0 .. 16.0; for each
    candidate assign q by rounding, refit scale and offset to those q by least squares (offset kept <= 0) and keep
    the candidate with the least squared error. Then per super-block d = max scale / 63 and dmin = max min / 63
    (rounded to fp16), each sub-block's scale and min are rounded to 6 bits against them, and q is assigned again
    as the nearest level of the grid the file actually holds.
    """
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim == 0 or a.shape[-1] % QK_K:
        raise ValueError(f"Q4_K: rows of {a.shape[-1] if a.ndim else 0} values are not whole {QK_K}-value blocks")
    blocks = a.reshape(-1, 8, 32)
    out = np.empty((blocks.shape[0], Q4_K_BLOCK_BYTES), dtype=np.uint8)
    for i in range(0, blocks.shape[0], _CHUNK):
        out[i:i + _CHUNK] = _q4_k_blocks(blocks[i:i + _CHUNK])
    return out.reshape(*a.shape[:-1], a.shape[-1] // QK_K * Q4_K_BLOCK_BYTES)


def _q4_k_blocks(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    scale, offset = _fit_sub_blocks(x.reshape(n * 8, 32))
    scale, mins = scale.reshape(n, 8), -offset.reshape(n, 8)
    d = (scale.max(1) / 63).astype(np.float16)
    dmin = (mins.max(1) / 63).astype(np.float16)
    sc = _six_bits(scale, d.astype(np.float32))
    mn = _six_bits(mins, dmin.astype(np.float32))
    step = (d.astype(np.float32)[:, None] * sc)[..., None]  # [n, 8, 1]: the grid the file holds
    low = (dmin.astype(np.float32)[:, None] * mn)[..., None]
    q = np.clip(np.rint(np.divide(x + low, step, out=np.zeros_like(x), where=step > 0)), 0, 15).astype(np.uint8)
    out = np.empty((n, Q4_K_BLOCK_BYTES), dtype=np.uint8)
    out[:, 0:2] = d.reshape(n, 1).view(np.uint8)
    out[:, 2:4] = dmin.reshape(n, 1).view(np.uint8)
    # 12 scale bytes: bytes 0-3 hold sc[0..3] in their low 6 bits and the top 2 bits of sc[4..7] above; bytes 4-7
    # the same for the mins; bytes 8-11 the low 4 bits of sc[4..7] (low nibble) and of mn[4..7] (high nibble).
    out[:, 4:8] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 8:12] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 12:16] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    # 128 value bytes: 32 bytes per pair of sub-blocks, the even one in the low nibbles, the odd one in the high.
    out[:, 16:] = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, 128)
    return out


def _six_bits(v: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """v [n, 8] >= 0 in multiples of unit [n] (fp16-rounded, so max(v) / unit may round to 64: clipped)."""
    u = unit[:, None]
    return np.clip(np.rint(np.divide(v, u, out=np.zeros_like(v), where=u > 0)), 0, 63).astype(np.uint8)


def _fit_sub_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [m, 32] -> per row (scale >= 0, offset <= 0) with x ~ scale * q + offset, q in 0..15 (see quantize_q4_k)."""
    lo = np.minimum(x.min(1), 0)[:, None]
    span = x.max(1)[:, None] - lo
    inv = np.divide(_LEVELS[:, None, None], span, out=np.zeros((len(_LEVELS), *span.shape), np.float32),
                    where=span > 0)  # [C, m, 1]
    q = (x - lo) * inv  # [C, m, 32]
    np.rint(q, out=q)
    np.clip(q, 0, 15, out=q)
    k = x.shape[1]
    sq = q.sum(-1)
    sqx = np.einsum("cmk,mk->cm", q, x)
    sqq = np.einsum("cmk,cmk->cm", q, q)
    sx, sxx = x.sum(-1), (x * x).sum(-1)
    det = k * sqq - sq * sq
    ok = det > 0  # all q equal (a constant sub-block): the least-squares fit is not unique; keep the grid's own
    grid_scale = np.divide(1, inv[..., 0], out=np.zeros_like(sq), where=inv[..., 0] > 0)
    scale = np.where(ok, (k * sqx - sq * sx) / np.where(ok, det, 1), grid_scale)
    offset = np.where(ok, (sqq * sx - sq * sqx) / np.where(ok, det, 1), np.broadcast_to(lo[:, 0], sq.shape))
    pos = offset > 0  # the best offset is above 0, which Q4_K cannot hold: refit the scale alone with offset 0
    scale = np.where(pos, np.divide(sqx, sqq, out=np.zeros_like(sqx), where=sqq > 0), scale)
    offset = np.where(pos, 0, offset)
    scale = np.maximum(scale, 0)
    # sum((scale * q + offset - x)^2), expanded into the sums above (no [C, m, 32] temporary)
    err = (scale * scale * sqq + 2 * scale * offset * sq + k * offset * offset - 2 * scale * sqx - 2 * offset * sx
           + sxx)
    best = err.argmin(0)
    rows = np.arange(x.shape[0])
    return scale[best, rows].astype(np.float32), offset[best, rows].astype(np.float32)


def _add_kv(w: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:  # lists: of ints become INT32 arrays (token types), of strings STRING arrays
        w.add_array(key, list(value))


# ---------------------------------------------------------------- tokenizer metadata


def _looks_special(token: str) -> bool:
    # The converter's does_token_look_special, for the cases DeepSeek vocabularies have.
    return token == "<pad>" or (token.startswith("<|") and token.endswith("|>")) or (
        token.startswith("<｜") and token.endswith("｜>")
    )


def gguf_tokenizer_metadata(
    tokenizer_json: str | Path, tokenizer_config: str | Path | None, pre: str, vocab_size: int | None = None
) -> dict[str, Any]:
    """`tokenizer.*` metadata for a byte-level BPE tokenizer.json, as the converter's get_vocab_base +
    SpecialVocab write it. `pre` is the llama.cpp pre-tokenizer name (the converter finds it by hashing
    the encoding of a probe text; here the caller says it)."""
    tj = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    tc = json.loads(Path(tokenizer_config).read_text(encoding="utf-8")) if tokenizer_config else {}
    model = tj["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{tokenizer_json}: not a BPE tokenizer")
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    reverse = {i: t for t, i in model["vocab"].items()} | {i: a["content"] for i, a in added.items()}
    n = vocab_size or max(reverse) + 1
    tokens, types = [], []
    for i in range(n):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tok = reverse[i]
            if added[i]["special"] or _looks_special(tok):
                types.append(TokenType.CONTROL)
            else:
                tok = tok.replace("\u2581", " ")
                types.append(TokenType.USER_DEFINED)
            tokens.append(tok)
        else:
            tokens.append(reverse[i])
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [int(t) for t in types],
        "tokenizer.ggml.merges": merges,
    }
    ids = {a["content"]: i for i, a in added.items()} | model["vocab"]
    for key, field in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"),
                       ("padding", "pad_token")):
        value = tc.get(field)
        content = value.get("content") if isinstance(value, dict) else value
        if content is not None and content in ids:
            meta[f"tokenizer.ggml.{key}_token_id"] = ids[content]
    for flag in ("add_bos_token", "add_eos_token"):
        if flag in tc:
            meta[f"tokenizer.ggml.{flag}"] = bool(tc[flag])
    if isinstance(tc.get("chat_template"), str):
        meta["tokenizer.chat_template"] = tc["chat_template"]
    return meta
