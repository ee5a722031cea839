"""GGUF files (llama.cpp's format) -> CausalLM.

Architectures: `llama` (DeepSeek-LLM, DeepSeek-Coder v1, R1-Distill-Llama, SmolLM2, other Llama-shaped files),
`qwen2` (R1-Distill-Qwen), `qwen3` (R1-0528-Qwen3) and `deepseek2` (llama.cpp's name for V2 / V2-Lite /
Coder-V2 / V3 / R1). The metadata becomes a ModelConfig; each tensor
is mapped onto our Hugging Face parameter names and dequantized into the compute dtype as it is copied
into an empty model, a block of rows at a time, so peak memory stays near the size of the weights.

What llama.cpp's converter changes, and we undo:
- Llama 3 RoPE scaling is not in the metadata but in a tensor, `rope_freqs.weight`: d/2 divisors of the
  inverse frequencies (RopeConfig.freq_factors).
- `llama` attn_q / attn_k rows are permuted per head from rotate-half order into interleaved-pair order
  (llama.cpp rotates adjacent pairs); we permute them back for our rotate-half RoPE. DeepSeek's MLA weights
  are already interleaved-pair, so deepseek2 files are left as they are (rope_interleave=True); qwen2/qwen3
  files are not permuted (llama.cpp runs them with rotate-half "NEOX" RoPE).
- deepseek2 kv_b_proj is split into attn_k_b [H, c, d_nope] (transposed) and attn_v_b [H, d_v, c] by
  current converters (older files keep attn_kv_b); we join them back.
- Expert weights are stacked ([E, I, M] ffn_{gate,up}_exps, [E, M, I] ffn_down_exps), as our Experts are.

Tensor / expert parallel ranks (distributed/parallel.py) read only their slices of the file, in its encoding: whole
rows for a column-parallel weight, a range of experts from a stack, and for a row-parallel weight a range of
columns that must be whole blocks of the format (32 values for Q8_0 / Q4_0, 256 for the K-quants), else the load
is refused before anything is read, naming the tensor.

The file is parsed here rather than with gguf.GGUFReader: the reader builds numpy views field by field
and takes ~12 s on this machine for SmolLM2's 49k-token vocabulary; this parser takes a fraction of a
second. Tensor data stays memory-mapped.
"""

from __future__ import annotations

import dataclasses
import logging
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

from selfseek import kernels
from selfseek.config import ConfigError, ModelConfig
from selfseek.models.model import CausalLM
from selfseek.models.quant import GROUP, quantize_weight
from selfseek.weights.safetensors import CheckpointError, _check_complete, build_empty, destinations

try:  # the per-type dequantizers, called on our own chunks of rows (see _CHUNK_VALUES)
    from gguf.quants import _type_traits as _QUANTS
except ImportError:  # a gguf release without them: the public function does the same, a bit slower
    _QUANTS = {}

__all__ = ["GGUFFile", "GGUFTensor", "SUPPORTED_TYPES", "gguf_config", "iter_gguf_tensors", "load_gguf"]

ARCHITECTURES = ("llama", "qwen2", "qwen3", "deepseek2")
T = GGMLQuantizationType
log = logging.getLogger(__name__)
# Types we read: dequantized bit-exactly by the gguf package's reference code (gguf.quants), kept packed as
# _BITS says. IQ2_S / IQ3_S come with the other IQ types of the popular 1.5-2.5-bit R1 quants.
SUPPORTED_TYPES = frozenset({
    T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K,
    T.IQ4_NL, T.IQ4_XS, T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S,
})
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
    part: int = 0  # which file of a split GGUF holds the data (index into GGUFFile._maps)

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.type]
        return self.shape[-1] // block * size


_SPLIT = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_parts(path: Path) -> list[Path]:
    """The files of a split GGUF (llama-gguf-split's `NAME-00001-of-00003.gguf`), given any one of them;
    [path] for a file that is not named as a part."""
    m = _SPLIT.match(path.name)
    if not m:
        return [path]
    n = int(m.group("count"))
    return [path.with_name(f"{m.group('prefix')}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]


@dataclass
class GGUFFile:
    """A parsed GGUF: metadata (key -> Python value) and tensor infos; tensor data memory-mapped.

    A split GGUF (`split.count` > 1) opens as one: the first part's metadata, every part's tensors."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    _maps: list[mmap.mmap] = field(repr=False)

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        path = Path(path)
        first = cls._open_one(path)
        count = int(first.metadata.get("split.count", 1))
        if count <= 1:
            return first
        parts = split_parts(path)
        if len(parts) != count:
            raise CheckpointError(f"{path}: one of {count} parts of a split GGUF (split.count), but its name is not "
                                  "NAME-0000i-of-0000n.gguf, so the other parts cannot be found")
        files = [first if p == path else None for p in parts]
        for i, p in enumerate(parts):
            if files[i] is None:
                if not p.is_file():
                    raise CheckpointError(f"{p}: part {i + 1} of {count} of split GGUF {parts[0].name} is missing")
                files[i] = cls._open_one(p)
            if int(files[i].metadata.get("split.no", -1)) != i:
                raise CheckpointError(f"{p}: split.no is {files[i].metadata.get('split.no')}, expected {i}")
        tensors: dict[str, TensorInfo] = {}
        for i, f in enumerate(files):
            for name, info in f.tensors.items():
                if name in tensors:
                    raise CheckpointError(f"{parts[i]}: tensor {name!r} is in two parts of the split GGUF")
                tensors[name] = dataclasses.replace(info, part=i)
        expected = files[0].metadata.get("split.tensors.count")
        if expected is not None and int(expected) != len(tensors):
            raise CheckpointError(f"{parts[0]}: split.tensors.count is {expected}, the parts hold {len(tensors)}")
        return cls(parts[0], files[0].metadata, tensors, [f._maps[0] for f in files])

    @classmethod
    def _open_one(cls, path: Path) -> GGUFFile:
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
        return cls(path, metadata, tensors, [mm])

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as uint8 [*shape[:-1], row_bytes], a view into the mapped file."""
        a = np.frombuffer(self._maps[info.part], dtype=np.uint8, count=info.nbytes, offset=info.offset)
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
_LLAMA_SHAPED_KEYS = {
    "vocab_size", "context_length", "embedding_length", "feed_forward_length", "block_count",
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.layer_norm_rms_epsilon", "rope.dimension_count", "rope.freq_base", "rope.scaling.type",
    "rope.scaling.factor", "rope.scaling.original_context_length", "rope.scaling.finetuned",
}
_KNOWN_KEYS = {
    "llama": _LLAMA_SHAPED_KEYS | {"rope.scale_linear", "expert_count", "expert_used_count"},
    "qwen2": _LLAMA_SHAPED_KEYS | {"rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow",
                                   "rope.scaling.yarn_attn_factor"},
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
_KNOWN_KEYS["qwen3"] = _KNOWN_KEYS["qwen2"]
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

    if arch != "deepseek2":
        if get("expert_count"):
            raise CheckpointError(f"{g.path}: mixture-of-experts llama files are not supported ({arch}.expert_count)")
        head_dim = get("attention.key_length") or hidden // heads
        if get("attention.value_length", head_dim) != head_dim:
            raise CheckpointError(f"{g.path}: key_length != value_length is not supported")
        if get("rope.dimension_count", head_dim) != head_dim:
            raise CheckpointError(f"{g.path}: partial rotary embedding ({arch}.rope.dimension_count "
                                  f"{get('rope.dimension_count')} < head dim {head_dim}) is not supported")
        d.update(model_type=arch, num_key_value_heads=get("attention.head_count_kv", heads), head_dim=head_dim)
        if arch != "qwen2":  # qwen2 always has q/k/v bias; llama and qwen3 (attention_bias) have o bias too
            d["attention_bias"] = "blk.0.attn_q.bias" in g.tensors
    else:
        d.update(_deepseek2_fields(g, get, req))
    if rope_scaling:
        d["rope_scaling"] = rope_scaling
    try:
        cfg = ModelConfig.from_dict(d, source=str(g.path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if _ROPE_FREQS in g.tensors:
        cfg = cfg.replace(rope=dataclasses.replace(cfg.rope, freq_factors=_rope_freqs(g, cfg)))
    return cfg


_ROPE_FREQS = "rope_freqs.weight"


def _rope_freqs(g: GGUFFile, cfg: ModelConfig) -> tuple[float, ...]:
    """The d/2 RoPE frequency divisors of `rope_freqs.weight` (llama.cpp's converter writes Llama 3.1's scaling
    so, with no rope.scaling keys); llama.cpp divides every rotary frequency by its factor."""
    info = g.tensors[_ROPE_FREQS]
    rope_dim = cfg.qk_rope_head_dim if cfg.is_mla else cfg.head_dim
    if info.type != T.F32 or info.shape != (rope_dim // 2,):
        raise CheckpointError(f"{g.path}: tensor {_ROPE_FREQS!r} is {info.type.name} {list(info.shape)}; expected "
                              f"F32 [{rope_dim // 2}] (half the rotary dimension)")
    if cfg.rope.type not in ("default", "linear"):
        raise CheckpointError(f"{g.path}: tensor {_ROPE_FREQS!r} with RoPE scaling type {cfg.rope.type!r} is not "
                              "supported")
    return tuple(float(x) for x in g.raw(info).view(np.float32))


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
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # qwen3
    "attn_k_norm.weight": "self_attn.k_norm.weight",
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


def iter_gguf_tensors(source: str | Path | GGUFFile, cfg: ModelConfig | None = None,
                      shard=None) -> Iterator[GGUFTensor]:
    """Each tensor of the file under our parameter name, still in its file encoding (see GGUFTensor); with `shard`
    (a distributed.parallel.Sharding applied to the model) only this rank's slice of each (`_shard_cuts`)."""
    g = source if isinstance(source, GGUFFile) else GGUFFile.open(source)
    cfg = cfg or gguf_config(g)
    for info, param, part, shape, raw in _pieces(g, cfg):
        if shard is not None:
            shape, raw = _cut_raw(info, shape, raw, _shard_cuts(shard, g.path, info, param, part, shape, cfg))
        if part in ("q", "k"):
            if cfg.model_type == "llama":  # this rank's heads (whole heads: a column-parallel slice)
                heads = cfg.num_attention_heads if part == "q" else cfg.num_key_value_heads
                raw = _unpermute_rows(raw, heads * shape[0] // info.shape[0], shape[0])
            part = None
        yield GGUFTensor(info.name, param, info.type, shape, raw, part)


def _pieces(g: GGUFFile, cfg: ModelConfig) -> Iterator[tuple[TensorInfo, str, str | None, tuple[int, ...], np.ndarray]]:
    """(info, our parameter, part, shape, raw view into the file) per stored tensor; a fused gate_up as its two
    halves (parts None and "up"). Nothing is read yet."""
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
        if part == "gate_up":  # [E, 2I, M]: first half gate, second half up
            half = info.shape[1] // 2
            shape = (info.shape[0], half, info.shape[2])
            yield info, param, None, shape, raw[:, :half]
            yield info, param.replace("gate_proj", "up_proj"), "up", shape, raw[:, half:]
            continue
        yield info, param, part, info.shape, raw


# ---------------------------------------------------------------- one rank's slices (distributed/parallel.py)


def check_shardable(g: GGUFFile, cfg: ModelConfig, shard) -> None:
    """Refuse, before any weight is built or read, a file whose quantized blocks this rank's slices would cut:
    the same rank's sharding applied to a float model on the meta device gives the rules (and refuses nothing
    that a quantized layer would refuse less clearly)."""
    probe = type(shard)(shard.layout, shard.rank)
    with torch.device("meta"):
        probe.apply(CausalLM(cfg))
    for info, param, part, shape, _ in _pieces(g, cfg):
        _shard_cuts(probe, g.path, info, param, part, shape, cfg)


def _shard_cuts(shard, path: Path, info: TensorInfo, param: str, part: str | None, shape: tuple[int, ...],
                cfg: ModelConfig) -> list[tuple[int, int, int]] | None:
    """This rank's (dim, start, length) cuts of one file tensor of `shape` (Sharding.cuts; None: zeros). Rows are
    moved whole, so quantized blocks stay intact; a cut across the rows (a row-parallel weight) must fall on the
    format's block boundary."""
    if part in ("k_b", "v_b"):  # the halves of kv_b_proj [H * (d_nope + d_v), c], heads first: whole heads
        per_head = cfg.qk_nope_head_dim + cfg.v_head_dim
        cuts = shard.cuts(param, (cfg.num_attention_heads * per_head, cfg.kv_lora_rank))
        cuts = cuts and [(d, start // per_head, n // per_head) for d, start, n in cuts]
    else:
        cuts = shard.cuts(param, shape)
    block = GGML_QUANT_SIZES[info.type][0]
    for dim, start, n in cuts or ():
        if dim == len(shape) - 1 and (start % block or n % block or start + n > shape[-1]):
            raise CheckpointError(
                f"{path}: tensor {info.name!r} ({info.type.name}, shape {list(shape)}) cannot be split across the "
                f"ranks: this rank's columns [{start}, {start + n}) of its rows of {shape[-1]} do not fall on the "
                f"{block}-value {info.type.name} block boundary (choose a tensor parallel size that divides "
                f"{shape[-1] // block} blocks, or a file with smaller blocks)")
    return cuts


def _cut_raw(info: TensorInfo, shape: tuple[int, ...], raw: np.ndarray,
             cuts: list[tuple[int, int, int]] | None) -> tuple[tuple[int, ...], np.ndarray]:
    """Apply cuts (checked by _shard_cuts) to a file tensor's bytes (uint8 [*shape[:-1], row_bytes]) -> (shape,
    raw): views into the file, except zero padding (vocabulary rows past the end) and a zero tensor (cuts None),
    whose all-zero bytes are zero in every GGML type (a zero scale)."""
    if cuts is None:
        return shape, np.zeros_like(raw)
    out = list(shape)
    for dim, start, n in cuts:
        if dim == len(out) - 1:  # whole blocks of every row
            block, size = GGML_QUANT_SIZES[info.type]
            raw = raw[..., start // block * size : (start + n) // block * size]
        else:
            have = max(0, min(n, out[dim] - start))
            part = raw[(slice(None),) * dim + (slice(start, start + have),)]
            if have < n:
                pad = list(part.shape)
                pad[dim] = n - have
                part = np.concatenate([part, np.zeros(pad, np.uint8)], axis=dim)
            raw = part
        out[dim] = n
    return tuple(out), raw


def _target(name: str, cfg: ModelConfig) -> tuple[str, str | None] | None:
    """File tensor name -> (our parameter, part) or None for tensors we do not store."""
    if name in _GLOBAL:
        return _GLOBAL[name], None
    if name == _ROPE_FREQS:  # read into the config (RopeConfig.freq_factors)
        return None
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
    if quant is None:
        return _np_dequantize(raw, qtype)
    quant.init_grid()  # the IQ types' lookup grids, built once (the public dequantize does the same)
    return quant.dequantize_rows(raw)


# ---------------------------------------------------------------- loading


def load_gguf(
    path: str | Path | GGUFFile,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    progress: bool = True,
    quantize: int | None = None,
    shard=None,
) -> CausalLM:
    """Load a .gguf file into a CausalLM.

    quantize=None keeps quantized weights quantized: K-quant tensors keep the file's blocks, Q8_0 / Q5_0 / Q5_1 /
    the IQ types become int8 blocks, Q4_0 and Q4_1 int4 blocks (models/quant.py, _BITS), float tensors load into
    `dtype`; 0 dequantizes everything
    into `dtype` ("auto": the file's 16-bit type or fp32); 8 or 4 re-quantizes every linear layer to that.
    shard: a distributed.parallel.Sharding: only this rank's part of each layer is built and read from the file.
    """
    g = path if isinstance(path, GGUFFile) else GGUFFile.open(path)
    cfg = gguf_config(g)
    check_tensor_types(g, cfg)
    if shard is not None:
        check_shardable(g, cfg, shard)
    bits = file_bits(g, cfg) if quantize is None else (quantize or None)
    model = build_empty(cfg, dtype, device, bits, shard)
    params = destinations(model)
    loaded: set[str] = set()
    kv_parts: dict[str, set[str]] = {}
    # One intra-op thread for the many 1 MiB copies: with two, every copy waits at a thread barrier, which on
    # a busy 2-core machine made them ~75x slower (SmolLM2: 9 s of copying instead of 0.2 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    stats: dict[str, _PackStats] = {}
    try:
        _load_tensors(g, cfg, model, params, loaded, kv_parts, progress, stats)
    finally:
        torch.set_num_threads(threads)
    _log_packing(g.path, stats)
    if cfg.num_nextn_predict_layers and not any(n.startswith("mtp.") for n in loaded):
        model.mtp = torch.nn.ModuleList()  # converters drop the MTP layer (llama.cpp does not run it)
    if cfg.tie_word_embeddings:
        loaded.add("lm_head.weight")
    _check_complete(model, loaded, g.path)
    return model


def check_tensor_types(g: GGUFFile, cfg: ModelConfig) -> None:
    """Refuse a file with a tensor type we cannot read before any weight is loaded, naming tensor and type."""
    for info in g.tensors.values():
        if info.type not in SUPPORTED_TYPES and _target(info.name, cfg) is not None:
            raise CheckpointError(f"{g.path}: tensor {info.name!r} has type {info.type.name}, which selfseek does "
                                  f"not read (supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})")


# The packed form a quantized GGUF type is kept in (models/quant.py). The K-quants keep the file's own bytes
# (packed formats "q2_k" .. "q6_k": the kernels decode their super-blocks per tile, bit-exact, no more bytes per
# weight than the file). The rest become 32-wide int8 blocks, or int4 blocks with a per-block min, with fp16
# scales. Exactly representable, so kept bit-exact (see _exact_scales): Q8_0, Q5_0 and IQ4_NL as int8 (D * q),
# Q5_1 as int8 with a min, Q4_0 / Q4_1 as int4. Not representable with one fp16 scale per 32 values (the IQ
# types' scaled grids): dequantized at load (bit-exact, gguf's reference code) and re-quantized to int8 blocks,
# which is lossy: each block's error is at most half its new step (max|w| / 254). The load logs that per type
# with the measured error.
_BITS: dict[GGMLQuantizationType, int | str] = {
    T.Q8_0: 8, T.Q5_0: 8, T.Q5_1: 8, T.IQ4_NL: 8,
    T.Q2_K: "q2_k", T.Q3_K: "q3_k", T.Q4_K: "q4_k", T.Q5_K: "q5_k", T.Q6_K: "q6_k",
    T.IQ4_XS: 8, T.IQ1_S: 8, T.IQ1_M: 8, T.IQ2_XXS: 8, T.IQ2_XS: 8, T.IQ2_S: 8, T.IQ3_XXS: 8, T.IQ3_S: 8,
    T.Q4_0: 4, T.Q4_1: 4,
}


def _exact_scales(raw: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Per 32-block fp16 scale D (and min M) under which every value of these rows is D * q (+ M) with an integer
    q, read from the blocks' own fields; None for types with no such form. The caller verifies the result."""
    block, size = GGML_QUANT_SIZES[qtype]
    b = np.ascontiguousarray(raw).reshape(raw.shape[0], -1, size)

    def f16(at: int) -> np.ndarray:
        return np.ascontiguousarray(b[:, :, at : at + 2]).view(np.float16)[..., 0]

    if qtype in (T.Q8_0, T.Q5_0, T.IQ4_NL):  # d * q, d * (q - 16), d * kvalues[q]
        return f16(0), None
    if qtype == T.Q4_0:  # d * (q - 8) = d * q + (-8 d); -8 d is exact in fp16 short of overflow (verified)
        return f16(0), (-8 * f16(0).astype(np.float32)).astype(np.float16)
    if qtype in (T.Q4_1, T.Q5_1):  # d * q + m
        return f16(0), f16(2)
    if qtype == T.Q3_K:  # d * (sc - 32) * (q - 4): int8 q = the product, in [-124, 128] (128 fails the check)
        return np.repeat(f16(size - 2), block // GROUP, axis=1), None
    return None


@dataclass
class _PackStats:
    bits: int | str
    tensors: int = 0
    exact_rows: int = 0
    rows: int = 0
    max_err: float = 0.0  # max |packed - file value|, relative to its block's max |value|


def _direct_pack(raw: np.ndarray, qtype: GGMLQuantizationType, bits: int):
    """Q8_0 as int8 and Q4_0 / Q4_1 as int4 blocks straight from the file's bytes (the same layouts: int8 values,
    or low nibbles = values 0..15 and high = 16..31, after an fp16 d (and m)); None where that is not exact."""
    block, size = GGML_QUANT_SIZES[qtype]
    b = np.ascontiguousarray(raw).reshape(raw.shape[0], -1, size)
    d = np.ascontiguousarray(b[:, :, 0:2]).view(np.float16)[..., 0]
    if qtype == T.Q8_0 and bits == 8:
        q = b[:, :, 2:].view(np.int8)
        if (q == -128).any():  # outside the packed int8 range [-127, 127] (llama.cpp never writes it)
            return None
        return torch.from_numpy(q.reshape(raw.shape[0], -1)), torch.from_numpy(d), None
    if qtype in (T.Q4_0, T.Q4_1) and bits == 4:
        if qtype == T.Q4_1:
            m = np.ascontiguousarray(b[:, :, 2:4]).view(np.float16)[..., 0]
        else:  # d * (q - 8) = d * q + (-8 d): exact in fp16 unless -8 d overflows
            m = (-8 * d.astype(np.float32)).astype(np.float16)
            if not np.array_equal(m.astype(np.float32), -8 * d.astype(np.float32)):
                return None
        qs = np.ascontiguousarray(b[:, :, size - 16 :]).reshape(raw.shape[0], -1)
        return torch.from_numpy(qs), torch.from_numpy(d), torch.from_numpy(m)
    return None


def _pack_rows(raw: np.ndarray, qtype: GGMLQuantizationType, bits: int,
               stats: _PackStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """File rows (uint8 [rows, row_bytes]) -> (qweight, scales, mins) in `bits` blocks: per row, the file's own
    scales when every value is D * q (+ M) exactly, else re-quantized from the bit-exact dequantization (in stats)."""
    direct = _direct_pack(raw, qtype, bits)
    if direct is not None:
        stats.rows += raw.shape[0]
        stats.exact_rows += raw.shape[0]
        return direct
    w = torch.from_numpy(_dequantize_rows(raw, qtype))
    rows, cols = w.shape
    stats.rows += rows
    blocks = w.reshape(rows, cols // GROUP, GROUP)
    exact = torch.zeros(rows, dtype=torch.bool)
    scales = _exact_scales(raw, qtype)
    if scales is not None:
        d = torch.from_numpy(scales[0])
        m = None if scales[1] is None else torch.from_numpy(scales[1])
        df, mf = d.float()[..., None], (0.0 if m is None else m.float()[..., None])
        qf = torch.round((blocks - mf) / torch.where(df == 0, 1.0, df))
        lo, hi = (-127, 127) if bits == 8 else (0, 15)
        exact = (((qf >= lo) & (qf <= hi)) & (qf * df + mf == blocks)).flatten(1).all(1)
        if bits == 8:
            q = qf.clamp(lo, hi).to(torch.int8).reshape(rows, cols)
        else:
            qf = qf.clamp(lo, hi).to(torch.uint8)
            q = (qf[..., :16] | (qf[..., 16:] << 4)).reshape(rows, cols // 2)
    stats.exact_rows += int(exact.sum())
    if exact.all():
        return q, d, m
    lossy = ~exact
    ql, dl, ml = quantize_weight(w[lossy], bits)
    if scales is None:
        q, d, m = ql, dl, ml
    else:
        q[lossy], d[lossy] = ql, dl
        if ml is not None or m is not None:
            m = torch.zeros_like(d) if m is None else m
            m[lossy] = 0 if ml is None else ml
    # The error of the re-quantized rows, against the file's values, for the load's log line.
    if bits == 8:
        back = ql.float().reshape(-1, cols // GROUP, GROUP) * dl.float()[..., None]
    else:
        nib = ql.reshape(-1, cols // GROUP, 16)
        back = torch.cat([nib & 15, nib >> 4], dim=-1).float() * dl.float()[..., None] + ml.float()[..., None]
    ref = blocks[lossy]
    amax = ref.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    stats.max_err = max(stats.max_err, ((back - ref).abs() / amax).max().item())
    return q, d, m


def _log_packing(path: Path, stats: dict[str, _PackStats]) -> None:
    for name, s in sorted(stats.items()):
        if isinstance(s.bits, str):
            log.info("%s: %d %s tensor(s) kept as the file's blocks", path.name, s.tensors, name)
        elif s.exact_rows == s.rows:
            log.info("%s: %d %s tensor(s) kept packed exactly as int%d blocks", path.name, s.tensors, name, s.bits)
        else:
            how = "dequantized at load and re-quantized" if name.startswith("IQ") else "re-quantized"
            log.warning("%s: %d %s tensor(s) %s to int%d blocks (%d of %d rows exact); lossy: max error %.3g of "
                        "each block's max |w|", path.name, s.tensors, name, how, s.bits, s.exact_rows, s.rows,
                        s.max_err)


def file_bits(g: GGUFFile, cfg: ModelConfig):
    """Parameter name -> 8 / 4 / None from the file's tensor types (None: a float tensor stays float)."""
    bits: dict[str, int | str] = {}
    for info in g.tensors.values():
        target = _target(info.name, cfg)
        if target and target[0] and info.type in _BITS:
            bits[target[0]] = _BITS[info.type]
            if target[1] == "gate_up":
                bits[target[0].replace("gate_proj", "up_proj")] = _BITS[info.type]
    return bits.get if bits else None


def _load_tensors(g: GGUFFile, cfg: ModelConfig, model: CausalLM, params: dict, loaded: set[str],
                  kv_parts: dict[str, set[str]], progress: bool, stats: dict[str, _PackStats]) -> None:
    halves: dict[str, dict[str, tuple]] = {}
    with tqdm(total=len(g.tensors), desc="Loading weights", unit="tensor", disable=not progress, leave=False) as bar:
        for t in iter_gguf_tensors(g, cfg, getattr(model, "shard", None)):
            if t.param not in params:
                raise CheckpointError(f"{g.path}: unexpected tensor {t.gguf_name!r} for a {cfg.model_type} model")
            kind, dest = params[t.param]
            if kind == "param":
                _copy_into(dest, t, cfg, g.path)
            else:
                _quantize_into(dest, t, g.path, stats)
            bar.update(t.part != "up")
            if t.part in ("k_b", "v_b"):
                kv_parts.setdefault(t.param, set()).add(t.part)
                packed = _split_kv_b_packed(t)
                if packed is not None:
                    halves.setdefault(t.param, {})[t.part] = packed
                if len(kv_parts[t.param]) < 2:
                    continue
            loaded.add(t.param)
    # the split kv_b_proj halves as the file packs them, for MLA's absorbed decode (MLA.keep_split_kv_b), once
    # kv_b_proj holds both (its weight's version then is the one they match)
    for param, parts in halves.items():
        if len(parts) == 2:
            model.get_submodule(param.rsplit(".", 2)[0]).keep_split_kv_b(parts["k_b"], parts["v_b"])


def _split_kv_b_packed(t: GGUFTensor) -> kernels.Weight | None:
    """attn_k_b [H, c, d] / attn_v_b [H, v, c] as a packed [H * rows, cols] weight holding the file's values
    exactly: a K-quant's super-blocks as they are, Q8_0 / Q4_0 / Q4_1 blocks directly, and types whose values are
    d * q (+ m) per 32 (Q5_0, Q5_1, ...) as int8 blocks (each row verified); else None (float files, or values no
    packing holds: the absorbed decode then reads kv_b_proj's float copy). llama.cpp's Q4_K_M / Q5_K_M files write
    k_b as Q5_0 (its rows of d_nope values are too short for a K-quant) and v_b as a K-quant."""
    raw = np.ascontiguousarray(t.raw).reshape(-1, t.raw.shape[-1])
    bits = _BITS.get(t.type)
    if isinstance(bits, str):
        return kernels.Packed(bits, torch.from_numpy(raw.copy()), torch.empty(raw.shape[0], 0, dtype=torch.uint8),
                              t.shape[-1])
    if bits is None:
        return None
    stats = _PackStats(bits)
    packed = _pack_rows(raw, t.type, bits, stats)
    if stats.exact_rows < stats.rows:
        return None
    return tuple(x.clone() if x is not None else None for x in packed)


@torch.no_grad()
def _quantize_into(dest, t: GGUFTensor, path: Path, stats: dict[str, _PackStats]) -> None:
    """A QuantLinear or QuantStack (models/quant.py), filled a block of rows at a time from the file's encoding:
    the file's own blocks where they are exactly representable, else re-quantized (see _BITS)."""
    stacked = t.raw.ndim == 3
    expect = tuple(dest.shape) if stacked else (dest.out_features, dest.in_features)
    if tuple(t.shape) != expect:
        raise CheckpointError(f"{path}: tensor {t.gguf_name!r} has shape {list(t.shape)}, the config implies "
                              f"{list(expect)}")
    raw = t.raw if stacked else t.raw[None]
    qweight, scales = (dest.qweight, dest.scales) if stacked else (dest.qweight[None], dest.scales[None])
    s = stats.setdefault(t.type.name, _PackStats(dest.bits))
    s.tensors += t.part != "up"
    step = max(1, _CHUNK_VALUES // t.shape[-1])
    if isinstance(dest.bits, str):  # a packed K-quant: the file's bytes as they are
        if _BITS.get(t.type) != dest.bits:
            raise CheckpointError(f"{path}: tensor {t.gguf_name!r} is {t.type.name}, its layer holds {dest.bits}")
        for e in range(raw.shape[0]):
            for r in range(0, raw.shape[1], step):
                qweight[e, r : r + step] = torch.from_numpy(np.ascontiguousarray(raw[e, r : r + step]))
        return
    for e in range(raw.shape[0]):
        for r in range(0, raw.shape[1], step):
            chunk = raw[e, r : r + step]
            q, d, m = _pack_rows(chunk, t.type, dest.bits, s)
            qweight[e, r : r + len(q)] = q
            scales[e, r : r + len(q)] = d
            if m is not None and dest.mins is None:  # int8 with a per-block min (Q5_1): w = d * q + m
                dest.mins = torch.zeros_like(dest.scales)
            if dest.mins is not None:
                mins = dest.mins if stacked else dest.mins[None]
                mins[e, r : r + len(q)] = 0 if m is None else m


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
    # One half of kv_b_proj [H * (d_nope + d_v), c], seen per head as [H, d_nope + d_v, c] (H: this rank's heads).
    c, nope, v = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim
    h = param.shape[0] // (nope + v)
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
