"""GGUF files (llama.cpp's format) -> CausalLM.

Architectures: `llama` (DeepSeek-LLM, DeepSeek-Coder v1, SmolLM2, other Llama-shaped files) and `deepseek2`
(llama.cpp's name for V2 / V2-Lite / Coder-V2 / V3 / R1). The metadata becomes a ModelConfig; each tensor
is mapped onto our Hugging Face parameter names and dequantized into the compute dtype as it is copied
into an empty model, a block of rows at a time, so peak memory stays near the size of the weights.

What llama.cpp's converter changes, and we undo:
- `llama` attn_q / attn_k rows are permuted per head from rotate-half order into interleaved-pair order
  (llama.cpp rotates adjacent pairs); we permute them back for our rotate-half RoPE. DeepSeek's MLA weights
  are already interleaved-pair, so deepseek2 files are left as they are (rope_interleave=True).
- deepseek2 kv_b_proj is split into attn_k_b [H, c, d_nope] (transposed) and attn_v_b [H, d_v, c] by
  current converters (older files keep attn_kv_b); we join them back.
- Expert weights are stacked ([E, I, M] ffn_{gate,up}_exps, [E, M, I] ffn_down_exps), as our Experts are.

The file is parsed here rather than with gguf.GGUFReader: the reader builds numpy views field by field
and takes ~12 s on this machine for SmolLM2's 49k-token vocabulary; this parser takes a fraction of a
second. Tensor data stays memory-mapped.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize as _np_dequantize
from tqdm import tqdm

from selfseek.config import ConfigError, ModelConfig
from selfseek.models.model import CausalLM
from selfseek.weights.safetensors import CheckpointError, _check_complete, build_empty, destinations, resolve_dtype

try:  # the per-type dequantizers, called on our own chunks of rows (see _CHUNK_VALUES)
    from gguf.quants import _type_traits as _QUANTS
except ImportError:  # a gguf release without them: the public function does the same, a bit slower
    _QUANTS = {}

__all__ = ["GGUFFile", "GGUFTensor", "SUPPORTED_TYPES", "gguf_config", "iter_gguf_tensors", "load_gguf"]

ARCHITECTURES = ("llama", "deepseek2")
T = GGMLQuantizationType
# Types we dequantize (and that a later quantized-linear step will keep packed).
SUPPORTED_TYPES = frozenset({T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K})
_FLOAT_DTYPES = {T.F32: np.float32, T.F16: np.float16}
_GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# Dequantize this many values at a time (1 MiB of fp32): the temporary stays in cache on its way into the
# parameter, and small even for a 129280 x 7168 embedding or a stack of 256 experts. Measured on SmolLM2:
# 2.6x faster than gguf.quants.dequantize over whole tensors (which works in groups of 16 rows).
_CHUNK_VALUES = 1 << 18


# ---------------------------------------------------------------- the file


@dataclass
class TensorInfo:
    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy / PyTorch order, outermost first (GGUF lists ne0 = innermost first)
    offset: int  # from the start of the file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.type]
        return self.shape[-1] // block * size


@dataclass
class GGUFFile:
    """A parsed GGUF: metadata (key -> Python value) and tensor infos; tensor data memory-mapped."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    _map: mmap.mmap = field(repr=False)

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                # Copy-on-write: numpy views are writable (torch.from_numpy wants that) but the file never is.
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise CheckpointError(f"{path}: cannot read as GGUF ({e})") from None
        try:
            metadata, tensors = _Parser(mm, path).parse()
        except CheckpointError:
            raise
        except _Truncated as e:
            raise CheckpointError(f"{path}: truncated or corrupt GGUF ({e})") from None
        except (struct.error, UnicodeDecodeError, ValueError, OverflowError) as e:
            raise CheckpointError(f"{path}: corrupt GGUF ({e})") from None
        return cls(path, metadata, tensors, mm)

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as uint8 [*shape[:-1], row_bytes], a view into the mapped file."""
        a = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        return a.reshape(*info.shape[:-1], info.row_bytes)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")


class _Truncated(Exception):
    pass


class _Parser:
    """GGUF v2/v3 header: magic, version, tensor count, KV count, KVs, tensor infos, aligned data."""

    _SCALARS = {
        GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
        GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
        GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
        GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
    }

    def __init__(self, mm: mmap.mmap, path: Path):
        self.buf, self.pos, self.size, self.path = mm, 0, len(mm), path

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated(f"needs {self.pos + n} bytes, the file has {self.size}")
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        start = self.take(n)
        return self.buf[start : start + n].decode("utf-8")

    def value(self, vtype: int) -> Any:
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            etype, count = GGUFValueType(self.unpack("<I")), self.unpack("<Q")
            if etype in self._SCALARS and etype != GGUFValueType.BOOL:
                dt = np.dtype(self._SCALARS[etype])
                start = self.take(count * dt.itemsize)
                return np.frombuffer(self.buf, dtype=dt, count=count, offset=start).tolist()
            if count > self.size - self.pos:  # every element takes at least one byte
                raise _Truncated(f"array of {count} elements at byte {self.pos}")
            return [self.value(etype) for _ in range(count)]
        return self.unpack(self._SCALARS[vtype])

    def parse(self) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
        if self.size < 4 or self.buf[:4] != _GGUF_MAGIC:
            raise CheckpointError(f"{self.path}: not a GGUF file (no 'GGUF' magic at the start)")
        self.take(4)
        version = self.unpack("<I")
        if version & 0xFFFF == 0:
            raise CheckpointError(f"{self.path}: big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self.unpack("<Q"), self.unpack("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self.string()
            metadata[key] = self.value(self.unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self.string()
            ndim = self.unpack("<I")
            if ndim > 8:
                raise _Truncated(f"tensor {name!r} claims {ndim} dimensions")
            dims = [self.unpack("<Q") for _ in range(ndim)]
            raw_type, offset = self.unpack("<I"), self.unpack("<Q")
            infos.append((name, dims, raw_type, offset))
        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise CheckpointError(f"{self.path}: general.alignment {alignment!r} is not a power of two")
        data_start = -(-self.pos // alignment) * alignment
        tensors: dict[str, TensorInfo] = {}
        for name, dims, raw_type, offset in infos:
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unknown GGML type id {raw_type}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            shape = tuple(reversed(dims)) or (1,)
            if shape[-1] % block:
                raise CheckpointError(f"{self.path}: tensor {name!r} rows of {shape[-1]} are not whole {qtype.name} "
                                      f"blocks of {block}")
            nbytes = math.prod(shape) // block * type_size
            start = data_start + offset
            if start + nbytes > self.size:
                raise CheckpointError(f"{self.path}: truncated GGUF: tensor {name!r} needs bytes up to "
                                      f"{start + nbytes}, the file has {self.size}")
            tensors[name] = TensorInfo(name, qtype, shape, start, nbytes)
        return metadata, tensors


# ---------------------------------------------------------------- metadata -> ModelConfig

# Keys (after "{arch}.") that cannot change the logits, or that we read below.
_KNOWN_KEYS = {
    "llama": {
        "vocab_size", "context_length", "embedding_length", "feed_forward_length", "block_count",
        "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
        "attention.layer_norm_rms_epsilon", "rope.dimension_count", "rope.freq_base", "rope.scale_linear",
        "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
        "rope.scaling.finetuned", "expert_count", "expert_used_count",
    },
    "deepseek2": {
        "vocab_size", "context_length", "embedding_length", "feed_forward_length", "block_count",
        "leading_dense_block_count", "attention.head_count", "attention.head_count_kv",
        "attention.key_length", "attention.value_length", "attention.key_length_mla",
        "attention.value_length_mla", "attention.q_lora_rank", "attention.kv_lora_rank",
        "attention.layer_norm_rms_epsilon", "rope.dimension_count", "rope.freq_base", "rope.scaling.type",
        "rope.scaling.factor", "rope.scaling.original_context_length", "rope.scaling.finetuned",
        "rope.scaling.yarn_log_multiplier", "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow",
        "rope.scaling.yarn_attn_factor", "expert_feed_forward_length", "expert_count", "expert_used_count",
        "expert_shared_count", "expert_weights_scale", "expert_weights_norm", "expert_gating_func",
        "expert_group_count", "expert_group_used_count", "nextn_predict_layers",
    },
}
_GATING = {1: "softmax", 2: "sigmoid"}  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE (3 = sqrtsoftplus: V4)


def gguf_config(g: GGUFFile) -> ModelConfig:
    """A ModelConfig from the file's metadata (as an HF config dict, so config.py's checks apply)."""
    arch = g.architecture
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{g.path}: unsupported GGUF architecture {arch!r} (general.architecture); supported: "
            f"{', '.join(ARCHITECTURES)}"
        )
    meta = g.metadata
    if int(meta.get("split.count", 1)) > 1:
        raise CheckpointError(f"{g.path}: one part of a split GGUF; merge the parts first "
                              "(llama-gguf-split --merge)")
    unknown = sorted(k for k in meta if k.startswith(f"{arch}.") and k[len(arch) + 1 :] not in _KNOWN_KEYS[arch])
    if unknown:
        raise CheckpointError(f"{g.path}: unknown GGUF metadata key(s) {', '.join(map(repr, unknown))} "
                              f"for architecture {arch!r}")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, list):  # per-layer arrays (hybrid models): not a shape we run
            raise CheckpointError(f"{g.path}: per-layer values for {arch}.{key} are not supported")
        return value

    def req(key: str) -> Any:
        if f"{arch}.{key}" not in meta:
            raise CheckpointError(f"{g.path}: missing GGUF metadata key {arch}.{key!r}")
        return get(key)

    embd = g.tensors.get("token_embd.weight")
    vocab = get("vocab_size") or (embd.shape[0] if embd else None) or len(meta.get("tokenizer.ggml.tokens", ()))
    hidden, heads = req("embedding_length"), req("attention.head_count")
    d: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length", 0),
        num_hidden_layers=req("block_count") - (get("nextn_predict_layers") or 0),
        num_attention_heads=heads,
        max_position_embeddings=get("context_length", 4096),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=get("rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in g.tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        torch_dtype=_file_dtype(g),
    )
    rope_scaling = _rope_scaling(get, g.path)
    if "rope_freqs.weight" in g.tensors:
        raise CheckpointError(f"{g.path}: per-dimension RoPE factors (tensor 'rope_freqs.weight', Llama-3 style "
                              "scaling) are not supported")

    if arch == "llama":
        if get("expert_count"):
            raise CheckpointError(f"{g.path}: mixture-of-experts llama files are not supported ({arch}.expert_count)")
        head_dim = get("attention.key_length") or hidden // heads
        if get("attention.value_length", head_dim) != head_dim:
            raise CheckpointError(f"{g.path}: key_length != value_length is not supported")
        if get("rope.dimension_count", head_dim) != head_dim:
            raise CheckpointError(f"{g.path}: partial rotary embedding ({arch}.rope.dimension_count "
                                  f"{get('rope.dimension_count')} < head dim {head_dim}) is not supported")
        d.update(model_type="llama", num_key_value_heads=get("attention.head_count_kv", heads), head_dim=head_dim,
                 attention_bias="blk.0.attn_q.bias" in g.tensors)
    else:
        d.update(_deepseek2_fields(g, get, req))
    if rope_scaling:
        d["rope_scaling"] = rope_scaling
    try:
        return ModelConfig.from_dict(d, source=str(g.path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _deepseek2_fields(g: GGUFFile, get, req) -> dict[str, Any]:
    rope_dim = req("rope.dimension_count")
    # Converters since the MLA split (llama.cpp #12801) write the per-head MLA sizes as key/value_length_mla
    # and the latent sizes as key/value_length; older files have the per-head sizes in key/value_length.
    if get("attention.key_length_mla") is not None:
        qk_dim, v_dim = req("attention.key_length_mla"), req("attention.value_length_mla")
    else:
        qk_dim, v_dim = req("attention.key_length"), req("attention.value_length")
    n_experts = get("expert_count") or 0
    gating = get("expert_gating_func") or 1  # absent: older V2 files, softmax (as llama.cpp assumes)
    if gating not in _GATING:
        raise CheckpointError(f"{g.path}: unsupported deepseek2.expert_gating_func {gating}")
    has_bias = any(n.endswith(".exp_probs_b.bias") for n in g.tensors)
    n_group = get("expert_group_count") or 1
    # GGUF does not record DeepSeek's topk_method; it follows from the gating. V3/R1: sigmoid + the
    # aux-loss-free bias (noaux_tc). V2: softmax, group-limited when the experts are grouped (the group
    # score is the group's best expert, as in DeepSeek's V2 code; llama.cpp ranks every grouped model
    # by the sum of its two best, the V3 rule).
    if _GATING[gating] == "sigmoid":
        if n_experts and not has_bias:
            raise CheckpointError(f"{g.path}: sigmoid expert gating without exp_probs_b bias tensors is not supported")
        model_type, topk_method = "deepseek_v3", "noaux_tc"
    else:
        if has_bias:
            raise CheckpointError(f"{g.path}: softmax expert gating with an exp_probs_b bias is not supported")
        model_type, topk_method = "deepseek_v2", ("group_limited_greedy" if n_group > 1 else "greedy")
    n_layers = req("block_count") - (get("nextn_predict_layers") or 0)
    return dict(
        model_type=model_type,
        num_key_value_heads=get("attention.head_count"),  # stored as 1 (MLA as MQA); meaningless for MLA
        kv_lora_rank=req("attention.kv_lora_rank"),
        q_lora_rank=get("attention.q_lora_rank") or None,  # 0 or absent: V2-Lite's plain q_proj
        qk_nope_head_dim=qk_dim - rope_dim,
        qk_rope_head_dim=rope_dim,
        v_head_dim=v_dim,
        rope_interleave=True,
        moe_intermediate_size=get("expert_feed_forward_length") or 0,
        n_routed_experts=n_experts,
        n_shared_experts=get("expert_shared_count") or 0,
        num_experts_per_tok=req("expert_used_count") if n_experts else 0,
        first_k_dense_replace=get("leading_dense_block_count", 0 if n_experts else n_layers),
        n_group=n_group,
        topk_group=get("expert_group_used_count") or 1,
        topk_method=topk_method,
        scoring_func=_GATING[gating],
        norm_topk_prob=bool(get("expert_weights_norm", False)),
        routed_scaling_factor=float(get("expert_weights_scale") or 1.0),
        num_nextn_predict_layers=(get("nextn_predict_layers") or 0) if model_type == "deepseek_v3" else 0,
    )


def _rope_scaling(get, path: Path) -> dict[str, Any] | None:
    kind = get("rope.scaling.type")
    if kind is None and get("rope.scale_linear"):  # older files
        return {"type": "linear", "factor": float(get("rope.scale_linear"))}
    if kind in (None, "none"):
        return None
    factor = get("rope.scaling.factor")
    if kind == "linear":
        return {"type": "linear", "factor": factor}  # a missing factor is config.py's error
    if kind == "yarn":
        out: dict[str, Any] = {"type": "yarn", "factor": factor,
                               "original_max_position_embeddings": get("rope.scaling.original_context_length")}
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                          ("yarn_attn_factor", "attention_factor")):
            if get(f"rope.scaling.{key}") is not None:
                out[name] = float(get(f"rope.scaling.{key}"))
        if get("rope.scaling.yarn_log_multiplier") is not None:
            # The converter stores 0.1 * mscale_all_dim and drops mscale; llama.cpp takes mscale equal to
            # mscale_all_dim (true of every DeepSeek release: 0.707/0.707 or 1/1), so the rotary factor is 1.
            m = float(get("rope.scaling.yarn_log_multiplier")) / 0.1
            out.update(mscale=m, mscale_all_dim=m)
        return out
    raise CheckpointError(f"{path}: unsupported RoPE scaling type {kind!r} (rope.scaling.type)")


def _file_dtype(g: GGUFFile) -> str | None:
    """The 16-bit dtype of a float16/bfloat16 file (for dtype="auto"); None (float32) otherwise."""
    types = {t.type for t in g.tensors.values() if len(t.shape) >= 2}
    return {T.F16: "float16", T.BF16: "bfloat16"}.get(next(iter(types))) if len(types) == 1 else None


# ---------------------------------------------------------------- tensors -> our parameters

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_a.weight": "self_attn.q_a_proj.weight",
    "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn_q_b.weight": "self_attn.q_b_proj.weight",
    "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn_kv_b.weight": "self_attn.kv_b_proj.weight",
    "attn_k_b.weight": "self_attn.kv_b_proj.weight",  # the k half, transposed (part "k_b")
    "attn_v_b.weight": "self_attn.kv_b_proj.weight",  # the v half (part "v_b")
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "ffn_gate_exps.weight": "mlp.experts.gate_proj",
    "ffn_up_exps.weight": "mlp.experts.up_proj",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
    "ffn_gate_up_exps.weight": "mlp.experts.gate_proj",  # fused; split into gate and up halves
    "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
}
# MTP block k (blk.{L + k}): its own tensors; the embedding and head copies are shared with the main model.
_NEXTN = {"nextn.eh_proj.weight": "eh_proj.weight", "nextn.enorm.weight": "enorm.weight",
          "nextn.hnorm.weight": "hnorm.weight", "nextn.shared_head_norm.weight": "shared_head.norm.weight"}
_NEXTN_SHARED = ("nextn.embed_tokens.weight", "nextn.shared_head_head.weight")


@dataclass
class GGUFTensor:
    """One file tensor on its way to our parameter `param`.

    raw: the file's bytes, uint8 [*shape[:-1], row_bytes] (a view into the mapped file, or a row-permuted
    copy for llama q/k): exactly what a packed Q8_0/Q4_x linear layer wants.
    shape: the logical shape, outermost first, as `dequantize` returns it.
    part: None when it fills the whole parameter; "k_b" / "v_b" for the two halves of a split kv_b_proj
    (k_b is [H, c, d_nope], the transpose of our per-head layout); "up" for the up half of a fused
    ffn_gate_up_exps (it fills up_proj whole; the gate half comes with part None).
    """

    gguf_name: str
    param: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]
    raw: np.ndarray
    part: str | None = None


def iter_gguf_tensors(source: str | Path | GGUFFile, cfg: ModelConfig | None = None) -> Iterator[GGUFTensor]:
    """Each tensor of the file under our parameter name, still in its file encoding (see GGUFTensor)."""
    g = source if isinstance(source, GGUFFile) else GGUFFile.open(source)
    cfg = cfg or gguf_config(g)
    for info in g.tensors.values():
        target = _target(info.name, cfg)
        if target is None:
            continue
        if info.type not in SUPPORTED_TYPES:
            raise CheckpointError(f"{g.path}: tensor {info.name!r} has type {info.type.name}, which selfseek does "
                                  f"not read (supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})")
        param, part = target
        if not param:
            raise CheckpointError(f"{g.path}: unexpected tensor {info.name!r} for a {cfg.model_type} model")
        raw = g.raw(info)
        if part in ("q", "k"):
            if cfg.model_type == "llama":
                heads = cfg.num_attention_heads if part == "q" else cfg.num_key_value_heads
                raw = _unpermute_rows(raw, heads, info.shape[0])
            part = None
        if part == "gate_up":  # [E, 2I, M]: first half gate, second half up
            half = info.shape[1] // 2
            shape = (info.shape[0], half, info.shape[2])
            yield GGUFTensor(info.name, param, info.type, shape, raw[:, :half])
            yield GGUFTensor(info.name, param.replace("gate_proj", "up_proj"), info.type, shape, raw[:, half:], "up")
            continue
        yield GGUFTensor(info.name, param, info.type, info.shape, raw, part)


def _target(name: str, cfg: ModelConfig) -> tuple[str, str | None] | None:
    """File tensor name -> (our parameter, part) or None for tensors we do not store."""
    if name in _GLOBAL:
        return _GLOBAL[name], None
    m = _BLOCK.match(name)
    if not m:
        return "", None  # unexpected
    layer, rest = int(m.group(1)), m.group(2)
    if rest.startswith("attn_rot_embd"):  # a table llama.cpp recomputes; some old files carry it
        return None
    if layer >= cfg.num_hidden_layers:  # MTP block
        k = layer - cfg.num_hidden_layers
        if rest in _NEXTN_SHARED:
            return None
        if rest in _NEXTN:
            return f"mtp.{k}.{_NEXTN[rest]}", None
        prefix = f"mtp.{k}.block."
    else:
        prefix = f"model.layers.{layer}."
    if rest not in _LAYER:
        return "", None
    part = {"attn_q.weight": "q", "attn_q.bias": "q", "attn_k.weight": "k", "attn_k.bias": "k",
            "attn_k_b.weight": "k_b", "attn_v_b.weight": "v_b", "ffn_gate_up_exps.weight": "gate_up"}.get(rest)
    return prefix + _LAYER[rest], part


def _unpermute_rows(raw: np.ndarray, heads: int, rows: int) -> np.ndarray:
    """Undo the converter's per-head row order [h, d/2, 2] -> rotate-half order [h, 2, d/2].

    Rows (of a weight; elements of a bias) are moved whole, so this works on quantized blocks as on floats.
    """
    return raw.reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2).reshape(raw.shape)


def dequantize(t: GGUFTensor) -> torch.Tensor:
    """fp32 tensor of `t.shape` (for a k_b part: [H, c, d_nope], as stored)."""
    return torch.from_numpy(_dequantize_rows(t.raw.reshape(-1, t.raw.shape[-1]), t.type)).reshape(t.shape)


def _dequantize_rows(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if qtype in _FLOAT_DTYPES:
        return np.ascontiguousarray(raw).view(_FLOAT_DTYPES[qtype]).astype(np.float32, copy=False)
    if qtype == T.BF16:
        return (np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    # gguf's numpy dequantizers measured as fast as plain torch versions here (SmolLM2: Q4_1, Q8_0).
    quant = _QUANTS.get(qtype)
    raw = np.ascontiguousarray(raw)
    return quant.dequantize_rows(raw) if quant is not None else _np_dequantize(raw, qtype)


# ---------------------------------------------------------------- loading


def load_gguf(
    path: str | Path | GGUFFile,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    progress: bool = True,
    quantize: int | None = None,
) -> CausalLM:
    """Load a .gguf file into a CausalLM.

    quantize=None keeps quantized weights quantized: Q8_0, Q5_K and Q6_K tensors become int8 blocks, Q4_0,
    Q4_1 and Q4_K int4 blocks (models/quant.py), float tensors load into `dtype`; 0 dequantizes everything
    into `dtype` ("auto": the file's 16-bit type or fp32); 8 or 4 re-quantizes every linear layer to that.
    """
    g = path if isinstance(path, GGUFFile) else GGUFFile.open(path)
    cfg = gguf_config(g)
    bits = file_bits(g, cfg) if quantize is None else (quantize or None)
    model = build_empty(cfg, resolve_dtype(dtype, cfg), device, bits)
    params = destinations(model)
    loaded: set[str] = set()
    kv_parts: dict[str, set[str]] = {}
    # One intra-op thread for the many 1 MiB copies: with two, every copy waits at a thread barrier, which on
    # a busy 2-core machine made them ~75x slower (SmolLM2: 9 s of copying instead of 0.2 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _load_tensors(g, cfg, model, params, loaded, kv_parts, progress)
    finally:
        torch.set_num_threads(threads)
    if cfg.num_nextn_predict_layers and not any(n.startswith("mtp.") for n in loaded):
        model.mtp = torch.nn.ModuleList()  # converters drop the MTP layer (llama.cpp does not run it)
    if cfg.tie_word_embeddings:
        loaded.add("lm_head.weight")
    _check_complete(model, loaded, g.path)
    return model


_BITS = {T.Q8_0: 8, T.Q5_K: 8, T.Q6_K: 8, T.Q4_0: 4, T.Q4_1: 4, T.Q4_K: 4}


def file_bits(g: GGUFFile, cfg: ModelConfig):
    """Parameter name -> 8 / 4 / None from the file's tensor types (None: a float tensor stays float)."""
    bits: dict[str, int] = {}
    for info in g.tensors.values():
        target = _target(info.name, cfg)
        if target and target[0] and info.type in _BITS:
            bits[target[0]] = _BITS[info.type]
            if target[1] == "gate_up":
                bits[target[0].replace("gate_proj", "up_proj")] = _BITS[info.type]
    return bits.get if bits else None


def _load_tensors(g: GGUFFile, cfg: ModelConfig, model: CausalLM, params: dict, loaded: set[str],
                  kv_parts: dict[str, set[str]], progress: bool) -> None:
    with tqdm(total=len(g.tensors), desc="Loading weights", unit="tensor", disable=not progress, leave=False) as bar:
        for t in iter_gguf_tensors(g, cfg):
            if t.param not in params:
                raise CheckpointError(f"{g.path}: unexpected tensor {t.gguf_name!r} for a {cfg.model_type} model")
            kind, dest = params[t.param]
            if kind == "param":
                _copy_into(dest, t, cfg, g.path)
            else:
                _quantize_into(dest, t, g.path)
            bar.update(t.part != "up")
            if t.part in ("k_b", "v_b"):
                kv_parts.setdefault(t.param, set()).add(t.part)
                if len(kv_parts[t.param]) < 2:
                    continue
            loaded.add(t.param)


@torch.no_grad()
def _quantize_into(dest, t: GGUFTensor, path: Path) -> None:
    """A QuantLinear or QuantStack (models/quant.py), filled a block of rows at a time from the file's encoding."""
    stacked = t.raw.ndim == 3
    expect = tuple(dest.shape) if stacked else (dest.out_features, dest.in_features)
    if tuple(t.shape) != expect:
        raise CheckpointError(f"{path}: tensor {t.gguf_name!r} has shape {list(t.shape)}, the config implies "
                              f"{list(expect)}")
    raw = t.raw if stacked else t.raw[None]
    step = max(1, _CHUNK_VALUES // t.shape[-1])
    for e in range(raw.shape[0]):
        for r in range(0, raw.shape[1], step):
            rows = torch.from_numpy(_dequantize_rows(raw[e, r : r + step], t.type))
            if stacked:
                dest.set_from_float(e, rows, r)
            else:
                dest.set_from_float(rows, r)


@torch.no_grad()
def _copy_into(param: torch.Tensor, t: GGUFTensor, cfg: ModelConfig, path: Path) -> None:
    if t.part in (None, "up"):
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointError(f"{path}: tensor {t.gguf_name!r} has shape {list(t.shape)}, the config implies "
                                  f"{list(param.shape)}")
        # Matrix by matrix (an expert stack is [E, rows, row_bytes]) and a block of rows at a time: views
        # into the mapped file, never a copy of a whole tensor.
        step = max(1, _CHUNK_VALUES // param.shape[-1])
        raw, dest = (t.raw[None], param[None]) if param.dim() == 1 else (t.raw, param)
        raw, dest = (raw[None], dest[None]) if dest.dim() == 2 else (raw, dest)
        for e in range(dest.shape[0]):
            for r in range(0, dest.shape[1], step):
                dest[e, r : r + step].copy_(torch.from_numpy(_dequantize_rows(raw[e, r : r + step], t.type)))
        return
    # One half of kv_b_proj [H * (d_nope + d_v), c], seen per head as [H, d_nope + d_v, c].
    h, c, nope, v = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim
    expect = (h, c, nope) if t.part == "k_b" else (h, v, c)
    if tuple(t.shape) != expect:
        raise CheckpointError(f"{path}: tensor {t.gguf_name!r} has shape {list(t.shape)}, the config implies "
                              f"{list(expect)}")
    w = dequantize(t)
    per_head = param.view(h, nope + v, c)
    if t.part == "k_b":
        per_head[:, :nope].copy_(w.transpose(1, 2))
    else:
        per_head[:, nope:].copy_(w)
