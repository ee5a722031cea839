"""One ModelConfig for every DeepSeek generation, read from a checkpoint's config.json.

Families: `llama` (DeepSeek-LLM, DeepSeek-Coder v1, R1-Distill-Llama and other Llama-shaped models), `qwen2`
(R1-Distill-Qwen: bias on q/k/v), `qwen3` (R1-0528-Qwen3: per-head RMSNorm on q and k before rotary),
`deepseek_v2` (V2, V2-Lite, Coder-V2: MLA + DeepSeekMoE with softmax routing), `deepseek_v3` (V3, R1,
V3.1: MLA + DeepSeekMoE with sigmoid `noaux_tc` routing, MTP, FP8 weights) and `deepseek_v32` (V3.2-Exp, V3.2:
V3 plus DeepSeek Sparse Attention, a lightning indexer per layer choosing `index_topk` keys per query) and
`deepseek_v4` (V4-Flash, V4-Pro: per-layer sliding-window / compressed sparse / heavily compressed attention,
hyper-connections, hash-routed and sqrtsoftplus MoE; the V4-only fields live in `V4Config`).

A field we do not know could change the math, so it is an error, not a silent default: every key of
config.json is either read here or listed in IGNORED_FIELDS (bookkeeping that cannot change the logits).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4")
# The Llama-shaped families: GQA attention (models/attention.py) and a dense SwiGLU in every layer.
GQA_MODEL_TYPES = ("llama", "qwen2", "qwen3")

# Keys that never change a forward pass: HF bookkeeping, training-only knobs, generation defaults.
IGNORED_FIELDS = frozenset(
    {
        "_name_or_path", "architectures", "auto_map", "transformers_version",
        "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
        "is_encoder_decoder", "id2label", "label2id", "problem_type", "use_cache", "initializer_range",
        "pad_token_id", "attention_dropout", "output_router_logits", "aux_loss_alpha", "seq_aux",
        "router_aux_loss_coef", "ep_size", "moe_layer_freq", "tokenizer_class", "model_name",
        "num_key_value_heads_", "qk_head_dim", "use_flash_attn", "_attn_implementation",
        "_commit_hash", "tie_encoder_decoder", "bad_words_ids", "do_sample", "max_length",
        "min_length", "num_beams", "temperature", "top_p", "top_k", "repetition_penalty",
        "generation_config", "pretraining_tp", "use_sliding_window", "sliding_window",
        "max_window_layers", "layer_types", "cross_attention_hidden_size", "tf_legacy_loss",
        "pruned_heads", "torchscript", "add_cross_attention", "finetuning_task", "prefix",
        "sep_token_id", "decoder_start_token_id", "task_specific_params", "tokenizer_name",
    }
)

# Fields read for each family (in addition to the common ones below).
_COMMON = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "tie_word_embeddings", "attention_bias", "mlp_bias", "head_dim", "rope_theta",
    "rope_scaling", "rope_parameters", "bos_token_id", "eos_token_id", "quantization_config", "torch_dtype", "dtype",
}
_MLA_MOE = {
    "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "moe_intermediate_size", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
    "first_k_dense_replace", "n_group", "topk_group", "topk_method", "scoring_func",
    "norm_topk_prob", "routed_scaling_factor", "rope_interleave", "num_nextn_predict_layers",
}
# V3.2's sparse attention; transformers also writes mlp_layer_types (checked against first_k_dense_replace).
_DSA = {"index_n_heads", "index_head_dim", "index_topk", "mlp_layer_types"}
# V4: transformers' current names plus the released checkpoints' legacy ones (compress_ratios, num_hash_layers, ...)
_V4 = {
    "q_lora_rank", "qk_rope_head_dim", "partial_rotary_factor", "moe_intermediate_size", "n_routed_experts",
    "n_shared_experts", "num_experts_per_tok", "topk_method", "scoring_func", "norm_topk_prob", "routed_scaling_factor",
    "num_nextn_predict_layers", "index_n_heads", "index_head_dim", "index_topk", "layer_types", "compress_rates",
    "compress_ratios", "compress_rate_csa", "compress_rate_hca", "compress_rope_theta", "hc_mult", "hc_sinkhorn_iters",
    "hc_eps", "mlp_layer_types", "num_hash_layers", "swiglu_limit", "sliding_window", "o_groups", "o_lora_rank",
    "router_jitter_noise", "expert_dtype",
}
KNOWN_FIELDS = {"llama": _COMMON, "qwen2": _COMMON | {"use_mrope"}, "qwen3": _COMMON, "deepseek_v2": _COMMON | _MLA_MOE,
                "deepseek_v3": _COMMON | _MLA_MOE, "deepseek_v32": _COMMON | _MLA_MOE | _DSA,
                "deepseek_v4": _COMMON | _V4}


class ConfigError(ValueError):
    """A config.json we cannot run faithfully; the message names the file and the field."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: `type` is default, linear, llama3 or yarn (DeepSeek's long-context scaling)."""

    type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    # Per-dimension divisors of the inverse frequencies (d/2 of them), as a GGUF's `rope_freqs.weight` carries
    # Llama 3's scaling (llama.cpp's rope_factors); applied before `type`'s own scaling.
    freq_factors: tuple[float, ...] | None = None


@dataclass(frozen=True)
class FP8Config:
    """Block-scaled FP8 weights (V3/R1/V3.1): W = fp8(W) * weight_scale_inv per block."""

    block_size: tuple[int, int] = (128, 128)
    scale_fmt: str | None = None  # None or "ue8m0" (V3.1/V3.2: power-of-two scales)


V4_LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
V4_RATIO_TO_LAYER_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}


@dataclass(frozen=True)
class V4Config:
    """DeepSeek-V4's own fields (models/deepseek_v4.py). Attention per layer: sliding window only, CSA (keys
    compressed every `compress_rate_csa` tokens, lightning indexer top-k) or HCA (every `compress_rate_hca`)."""

    layer_types: tuple[str, ...]
    mlp_layer_types: tuple[str, ...]  # "hash_moe" (token-id routed) or "moe"
    compress_rate_csa: int = 4
    compress_rate_hca: int = 128
    compress_rope: RopeConfig = field(default_factory=RopeConfig)  # the compressed branches' rotary (YaRN)
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    o_groups: int = 8
    o_lora_rank: int = 1024
    mtp_layer_types: tuple[str, ...] = ()  # the MTP layers' attention (released `compress_ratios` past the layers)

    def compress_rate(self, layer_type: str) -> int:
        """m of a layer type: 0 for the sliding window only."""
        return {"compressed_sparse_attention": self.compress_rate_csa,
                "heavily_compressed_attention": self.compress_rate_hca}.get(layer_type, 0)


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # per-head dim of Llama-shaped attention (MLA uses the qk_/v_ dims below)
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v and o projections
    qkv_bias: bool = False  # bias on q, k, v only (qwen2)
    qk_norm: bool = False  # RMSNorm over each head of q and k before rotary (qwen3)
    rope: RopeConfig = field(default_factory=RopeConfig)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # MLA
    kv_lora_rank: int = 0
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True
    # DeepSeekMoE
    moe_intermediate_size: int = 0
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    first_k_dense_replace: int = 0
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"  # greedy | group_limited_greedy | noaux_tc
    scoring_func: str = "softmax"  # softmax | sigmoid
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    # V3 extras
    num_nextn_predict_layers: int = 0
    # V3.2 DeepSeek Sparse Attention (0 heads: none): the lightning indexer's heads and head dim, keys kept per query
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    fp8: FP8Config | None = None
    weight_bits: int | None = None  # a checkpoint written by `selfseek quantize` (8 or 4)
    v4: V4Config | None = None  # deepseek_v4 only
    torch_dtype: str | None = None  # the dtype the checkpoint was saved in, for dtype="auto"

    @property
    def is_mla(self) -> bool:
        return self.model_type in ("deepseek_v2", "deepseek_v3", "deepseek_v32")

    @property
    def has_indexer(self) -> bool:
        """V3.2: every MLA layer has a lightning indexer (models/indexer.py) with its own key cache."""
        return self.index_n_heads > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_values_per_token_per_layer(self) -> int:
        """What a KV cache stores per token per layer: the MLA latent, or K and V per KV head."""
        if self.is_mla:  # V3.2: the indexer's key sits beside the latent, in the same pool row
            return self.kv_lora_rank + self.qk_rope_head_dim + (self.index_head_dim if self.has_indexer else 0)
        return 2 * self.num_key_value_heads * self.head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.is_mla and self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times mscale^2 under YaRN (V2 paper App. C; `yarn_get_mscale` in the reference)."""
        d = self.qk_head_dim if self.is_mla else self.head_dim
        scale = d**-0.5
        r = self.rope
        if self.is_mla and r.type == "yarn" and r.mscale_all_dim:
            m = yarn_mscale(r.factor, r.mscale_all_dim)
            scale *= m * m
        return scale

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        return _parse(d, source)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json found")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return _parse(d, str(path))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when not stretching)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _parse(d: dict[str, Any], source: str) -> ModelConfig:
    def fail(msg: str) -> ConfigError:
        return ConfigError(f"{source}: {msg}")

    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise fail(
            f"unsupported model_type {model_type!r} (field 'model_type'); supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    unknown = sorted(k for k in d if k not in KNOWN_FIELDS[model_type] and k not in IGNORED_FIELDS)
    if unknown:
        raise fail(f"unknown config field(s) {', '.join(map(repr, unknown))} for model_type {model_type!r}")

    def req(key: str) -> Any:
        if d.get(key) is None:
            raise fail(f"missing required field {key!r}")
        return d[key]

    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise fail(f"unsupported hidden_act {act!r} (field 'hidden_act'); DeepSeek models use 'silu'")
    # qwen2 has q/k/v bias whatever attention_bias says (transformers' Qwen2Attention does not read it).
    for flag in ("mlp_bias",) + (("attention_bias",) if model_type not in ("llama", "qwen3") else ()):
        if d.get(flag):
            raise fail(f"unsupported {flag}=true (field {flag!r})")
    if d.get("use_mrope"):  # R1-Distill-Qwen configs carry use_mrope: false (multimodal RoPE is Qwen2-VL's)
        raise fail("multimodal RoPE is not supported (field 'use_mrope')")
    if d.get("pretraining_tp", 1) not in (1, None):
        raise fail("unsupported pretraining_tp != 1 (field 'pretraining_tp')")
    # qwen2/qwen3 configs carry sliding_window with use_sliding_window false: full attention everywhere.
    if d.get("use_sliding_window") or (d.get("sliding_window") and model_type == "llama"):
        raise fail("sliding-window attention is not supported (field 'sliding_window')")

    heads = req("num_attention_heads")
    hidden = req("hidden_size")
    if model_type == "deepseek_v4":  # no dense FFN: the shared expert's width stands for intermediate_size
        d = {**d, "intermediate_size": d.get("intermediate_size") or req("moe_intermediate_size")}
    kw: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=req("vocab_size"),
        hidden_size=hidden,
        intermediate_size=req("intermediate_size"),
        num_hidden_layers=req("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or hidden // heads,
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", False)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        rope=_parse_rope(d, fail) if model_type != "deepseek_v4" else RopeConfig(),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        torch_dtype=d.get("torch_dtype") or d.get("dtype"),
    )
    if model_type in GQA_MODEL_TYPES and heads % kw["num_key_value_heads"]:
        raise fail("num_attention_heads must be a multiple of num_key_value_heads")

    if model_type == "deepseek_v4":
        kw.update(_parse_v4(d, kw, fail))
    elif model_type not in GQA_MODEL_TYPES:
        is_v3 = model_type in ("deepseek_v3", "deepseek_v32")
        topk_method = d.get("topk_method") or ("noaux_tc" if is_v3 else "greedy")
        if topk_method == "gready":  # DeepSeek's hub code spells it so in V2-Lite configs
            topk_method = "greedy"
        if topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise fail(f"unsupported topk_method {topk_method!r} (field 'topk_method')")
        scoring = d.get("scoring_func") or ("sigmoid" if is_v3 else "softmax")
        if scoring not in ("softmax", "sigmoid"):
            raise fail(f"unsupported scoring_func {scoring!r} (field 'scoring_func')")
        n_routed = d.get("n_routed_experts") or 0
        n_group = d.get("n_group") or 1
        if n_routed and n_routed % n_group:
            raise fail("n_routed_experts must be a multiple of n_group (field 'n_group')")
        kw.update(
            head_dim=req("v_head_dim"),
            kv_lora_rank=req("kv_lora_rank"),
            q_lora_rank=d.get("q_lora_rank") or None,  # V2-Lite: null -> plain q_proj
            qk_nope_head_dim=req("qk_nope_head_dim"),
            qk_rope_head_dim=req("qk_rope_head_dim"),
            v_head_dim=req("v_head_dim"),
            rope_interleave=bool(d.get("rope_interleave", True)),
            moe_intermediate_size=d.get("moe_intermediate_size") or 0,
            n_routed_experts=n_routed,
            n_shared_experts=d.get("n_shared_experts") or 0,
            num_experts_per_tok=(req("num_experts_per_tok") if n_routed else 0),
            first_k_dense_replace=d.get("first_k_dense_replace") or 0,
            n_group=n_group,
            topk_group=d.get("topk_group") or 1,
            topk_method=topk_method,
            scoring_func=scoring,
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
            num_nextn_predict_layers=d.get("num_nextn_predict_layers") or 0,
        )
    if model_type == "deepseek_v32":
        kw.update(_parse_dsa(d, kw, fail))
    if d.get("quantization_config"):
        q = d["quantization_config"]
        if q.get("quant_method") == "selfseek":
            if q.get("bits") not in (8, 4) or q.get("group_size", 32) != 32:
                raise fail("quantization_config of quant_method 'selfseek' needs bits 8 or 4 and group_size 32")
            kw["weight_bits"] = q["bits"]
        else:
            kw["fp8"] = _parse_quantization(q, fail)
    return ModelConfig(**kw)


def _parse_dsa(d: dict[str, Any], kw: dict[str, Any], fail) -> dict[str, Any]:
    """The V3.2 indexer fields (defaults: the released V3.2 config, 64 heads x 128, top-2048)."""
    defaults = {"index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}
    out = {key: d[key] if d.get(key) is not None else v for key, v in defaults.items()}
    for key, v in out.items():
        if not isinstance(v, int) or v <= 0:
            raise fail(f"{key} must be a positive integer, got {v!r} (field {key!r})")
    if kw["q_lora_rank"] is None:
        raise fail("deepseek_v32's indexer reads the compressed query: q_lora_rank is required (field 'q_lora_rank')")
    if not kw["qk_rope_head_dim"] < out["index_head_dim"]:
        raise fail("index_head_dim must exceed qk_rope_head_dim (the indexer ropes its first qk_rope_head_dim "
                   "values) (field 'index_head_dim')")
    if d.get("mlp_layer_types") is not None:
        k = min(kw["first_k_dense_replace"], kw["num_hidden_layers"])
        expect = ["dense"] * k + ["sparse"] * (kw["num_hidden_layers"] - k)
        if list(d["mlp_layer_types"]) != expect:
            raise fail(f"mlp_layer_types {d['mlp_layer_types']} differs from first_k_dense_replace "
                       f"{kw['first_k_dense_replace']} (field 'mlp_layer_types')")
    return out


def _parse_v4(d: dict[str, Any], kw: dict[str, Any], fail) -> dict[str, Any]:
    """DeepSeek-V4 (transformers' DeepseekV4Config, defaults = V4-Flash): legacy names folded in as it does."""
    n = kw["num_hidden_layers"]
    head_dim = d.get("head_dim") or 512
    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128, **(d.get("compress_rates") or {})}
    for key, lt in zip(("compress_rate_csa", "compress_rate_hca"), V4_LAYER_TYPES[1:], strict=True):
        if d.get(key) is not None:
            rates[lt] = d[key]
    if set(rates) != set(V4_LAYER_TYPES[1:]) or any(not isinstance(v, int) or v < 1 for v in rates.values()):
        raise fail(f"compress_rates must give a positive rate for each compressed layer type, got {rates} "
                   "(field 'compress_rates')")
    mtp_types: tuple[str, ...] = ()
    layer_types = d.get("layer_types")
    if layer_types is None and d.get("compress_ratios") is not None:
        ratios = list(d["compress_ratios"])
        bad = [r for r in ratios if r not in V4_RATIO_TO_LAYER_TYPE]
        if bad:
            raise fail(f"compress_ratios entries must be 0, 4 or 128, got {bad} (field 'compress_ratios')")
        layer_types = [V4_RATIO_TO_LAYER_TYPE[r] for r in ratios]
        mtp_types = tuple(layer_types[n:])
    if layer_types is None:  # transformers' default: 2x HCA then CSA / HCA interleaved (V4-Pro)
        layer_types = ["heavily_compressed_attention"] * min(n, 2) + [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(max(n - 2, 0))]
    layer_types = list(layer_types)
    if len(layer_types) < n or any(t not in V4_LAYER_TYPES for t in layer_types):
        raise fail(f"layer_types needs {n} entries from {V4_LAYER_TYPES}, got {layer_types} (field 'layer_types')")
    mlp_types = d.get("mlp_layer_types")
    if mlp_types is None:
        n_hash = d.get("num_hash_layers")
        n_hash = 3 if n_hash is None else n_hash
        mlp_types = ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash)
    mlp_types = list(mlp_types)
    if len(mlp_types) < n or any(t not in ("hash_moe", "moe") for t in mlp_types):
        raise fail(f"mlp_layer_types needs {n} entries of 'hash_moe' / 'moe', got {mlp_types} "
                   "(field 'mlp_layer_types')")
    if d.get("partial_rotary_factor") is not None:
        rope_dim = int(head_dim * d["partial_rotary_factor"])
    else:
        rope_dim = d.get("qk_rope_head_dim") or head_dim // 8
    scoring = d.get("scoring_func") or "sqrtsoftplus"
    if scoring not in ("sqrtsoftplus", "sigmoid", "softmax"):
        raise fail(f"unsupported scoring_func {scoring!r} (field 'scoring_func')")
    topk_method = d.get("topk_method") or "noaux_tc"
    if topk_method not in ("noaux_tc", "greedy"):
        raise fail(f"unsupported topk_method {topk_method!r} for deepseek_v4 (field 'topk_method')")
    if (d.get("num_key_value_heads") or 1) != 1:
        raise fail("deepseek_v4 attention has one shared KV head (field 'num_key_value_heads')")
    if d.get("router_jitter_noise"):
        raise fail("router_jitter_noise is training-only and must be 0 (field 'router_jitter_noise')")
    main, compress = _parse_v4_ropes(d, fail)
    q_lora = d.get("q_lora_rank") or 1024
    v4 = V4Config(
        layer_types=tuple(layer_types[:n]), mlp_layer_types=tuple(mlp_types[:n]),
        compress_rate_csa=rates["compressed_sparse_attention"], compress_rate_hca=rates["heavily_compressed_attention"],
        compress_rope=compress, hc_mult=d.get("hc_mult") or 4, hc_sinkhorn_iters=d.get("hc_sinkhorn_iters") or 20,
        hc_eps=float(d.get("hc_eps") or 1e-6), swiglu_limit=float(d.get("swiglu_limit") or 0.0),
        sliding_window=d.get("sliding_window") or 128, o_groups=d.get("o_groups") or 8,
        o_lora_rank=d.get("o_lora_rank") or 1024, mtp_layer_types=mtp_types,
    )
    heads = kw["num_attention_heads"]
    if heads % v4.o_groups:
        raise fail(f"num_attention_heads {heads} must be a multiple of o_groups {v4.o_groups} (field 'o_groups')")
    return dict(
        head_dim=head_dim, num_key_value_heads=1, q_lora_rank=q_lora, qk_rope_head_dim=rope_dim,
        moe_intermediate_size=_req_int(d, "moe_intermediate_size", fail),
        n_routed_experts=d.get("n_routed_experts") or 256, n_shared_experts=d.get("n_shared_experts") or 0,
        num_experts_per_tok=d.get("num_experts_per_tok") or 6, topk_method=topk_method, scoring_func=scoring,
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.5)),
        num_nextn_predict_layers=d.get("num_nextn_predict_layers") or 0,
        index_n_heads=d.get("index_n_heads") or 64, index_head_dim=d.get("index_head_dim") or 128,
        index_topk=d.get("index_topk") or 512, rope=main, v4=v4,
    )


def _req_int(d: dict[str, Any], key: str, fail) -> int:
    if not isinstance(d.get(key), int) or d[key] <= 0:
        raise fail(f"missing or non-positive {key!r} (field {key!r})")
    return d[key]


def _parse_v4_ropes(d: dict[str, Any], fail) -> tuple[RopeConfig, RopeConfig]:
    """V4's two rotaries: "main" (sliding-window-only layers, plain theta) and "compress" (CSA/HCA layers, their
    compressors and the indexer: compress_rope_theta, with the checkpoint's YaRN at attention factor 1.0).
    transformers writes them nested under rope_parameters; released configs write rope_scaling + the thetas."""
    rp = d.get("rope_parameters") or {}
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main_d, comp_d = dict(rp["main"]), dict(rp["compress"])
    else:
        yarn = {k: v for k, v in {**rp, **(d.get("rope_scaling") or {})}.items() if k not in ("rope_theta",)}
        main_d = {"rope_type": "default", "rope_theta": d.get("rope_theta", 10000.0)}
        comp_d = {**yarn, "rope_theta": d.get("compress_rope_theta", 160000.0)}
    ropes = []
    for sub in (main_d, comp_d):
        sub.pop("partial_rotary_factor", None)  # the rotary width is qk_rope_head_dim, read above
        kind = sub.get("rope_type") or sub.get("type") or "default"
        if kind == "yarn":
            sub.setdefault("attention_factor", 1.0)  # the reference does not scale cos/sin by YaRN's mscale
        sub_max = {"max_position_embeddings": d.get("max_position_embeddings", 1048576)}
        ropes.append(_parse_rope({**sub_max, "rope_parameters": sub}, fail))
    return ropes[0], ropes[1]


def _parse_rope(d: dict[str, Any], fail) -> RopeConfig:
    # transformers v5 writes `rope_parameters` (theta inside); released checkpoints write `rope_scaling` + `rope_theta`.
    params = dict(d.get("rope_parameters") or {})
    params.update(d.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
    rtype = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    known = {
        "default": set(),
        "linear": {"factor"},
        "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
        "yarn": {
            "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
            "mscale_all_dim", "attention_factor", "truncate",
        },
    }
    if rtype not in known:
        raise fail(f"unsupported rope type {rtype!r} (field 'rope_scaling.type')")
    if params.get("partial_rotary_factor") in (1, 1.0):
        del params["partial_rotary_factor"]
    if rtype == "yarn":
        # vLLM's and llama.cpp's name (rope.scaling.attn_factor). transformers does not read it (an unrecognized key:
        # its YaRN attention factor comes from attention_factor, else mscale/mscale_all_dim), so neither do we.
        params.pop("attn_factor", None)
    unknown = sorted(set(params) - known[rtype])
    if unknown:
        raise fail(f"unknown rope_scaling field(s) {', '.join(map(repr, unknown))} for rope type {rtype!r}")
    if rtype == "default":
        return RopeConfig(theta=theta)
    factor = params.get("factor")
    if factor is None and rtype == "yarn" and params.get("original_max_position_embeddings"):
        factor = d.get("max_position_embeddings", 0) / params["original_max_position_embeddings"]
    if factor is None:
        raise fail(f"rope type {rtype!r} needs 'factor' (field 'rope_scaling.factor')")
    if rtype in ("yarn", "llama3") and not params.get("original_max_position_embeddings"):
        raise fail(f"rope type {rtype!r} needs 'original_max_position_embeddings'")
    return RopeConfig(
        type=rtype,
        theta=theta,
        factor=float(factor),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
    )


def _parse_quantization(q: dict[str, Any] | None, fail) -> FP8Config | None:
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise fail(f"unsupported quantization_config.quant_method {method!r}; supported: 'fp8', 'selfseek'")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise fail(f"unsupported quantization_config.fmt {fmt!r}; supported: 'e4m3'")
    block = tuple(q.get("weight_block_size") or (128, 128))
    if len(block) != 2:
        raise fail("quantization_config.weight_block_size must have two entries")
    scale_fmt = q.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise fail(f"unsupported quantization_config.scale_fmt {scale_fmt!r}")
    return FP8Config(block_size=(int(block[0]), int(block[1])), scale_fmt=scale_fmt)
