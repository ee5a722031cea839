"""Hugging Face checkpoint folders -> CausalLM, streamed tensor by tensor from safetensors files.

The model is built on the meta device, given empty storage in the compute dtype, and each checkpoint
tensor is read (plain reads, not a memory map, so no file pages pile up in the process) into a buffer,
copied into its place and dropped: peak memory stays at the weights plus one tensor.
FP8 (e4m3) weights stay FP8 with their `weight_scale_inv` (V4: `scale`) on a CPU (models/quant.py pack_fp8, run by
the kernels), and so do V4's FP4 experts (int8 e2m1 pairs with ue8m0 `scale`s per 32, pack_fp4); elsewhere, or
sharded, they are dequantized on the way in.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from selfseek import kernels
from selfseek.config import ModelConfig
from selfseek.models import deepseek_v4
from selfseek.models.model import CausalLM
from selfseek.models.quant import (
    QuantEmbedding,
    QuantLinear,
    QuantStack,
    compute_dtype_for,
    keep_16bit_storage,
    pack_fp4,
    pack_fp8,
    quantize_model,
)


class CheckpointError(ValueError):
    """A checkpoint we cannot load; the message names the file and, where there is one, the tensor."""


# Tensors some exporters write that carry nothing we need.
_SKIPPED = re.compile(r".*rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
# MTP tensors that duplicate the main model's embedding and head ("Shares parameters").
_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")
_MTP_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")


@dataclass
class Target:
    """Where one checkpoint tensor goes: a parameter, optionally one expert's slot or half of a fused tensor."""

    param: str
    index: int | None = None  # expert index into a stacked [E, ...] parameter
    half: int | None = None  # 0/1: first or second half of dim 1 (fused gate_up_proj)


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from model.safetensors.index.json or a single model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files = {name: path / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                first = next(n for n, g in files.items() if g == f)
                raise CheckpointError(f"{f}: shard listed in {index.name} is missing (it holds tensor {first!r})")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    files: dict[str, Path] = {}
    for f in shards:
        for name in _open(f).keys():
            files[name] = f
    return files


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFile:
    """A safetensors file read with plain reads: an 8-byte header length, a JSON header, then the data."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._f = open(path, "rb")
            size = os.fstat(self._f.fileno()).st_size
            n = int.from_bytes(self._f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(self._f.read(n))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries = header
        for name, e in header.items():
            end = e.get("data_offsets", [0, 0])[1]
            if e.get("dtype") not in _ST_DTYPES or self.base + end > size:
                raise CheckpointError(f"{path}: tensor {name!r} is truncated or of unknown dtype {e.get('dtype')!r} "
                                      f"(the file has {size} bytes)")

    def keys(self):
        return self.entries.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        start, end = e["data_offsets"]
        t = torch.empty(e["shape"], dtype=_ST_DTYPES[e["dtype"]])
        if end > start:
            self._f.seek(self.base + start)
            buf = memoryview(t.view(-1).view(torch.uint8).numpy())
            if self._f.readinto(buf) != end - start:
                raise CheckpointError(f"{self.path}: tensor {name!r} is truncated")
        return t

    def close(self) -> None:
        self._f.close()


def _open(f: Path) -> SafetensorsFile:
    return SafetensorsFile(f)


def target_of(name: str, cfg: ModelConfig) -> Target | None:
    """Map a Hugging Face tensor name onto our parameter names (None: not stored by us)."""
    if cfg.v4 is not None:  # released V4 names (and transformers' saved mix of both) -> transformers' module names
        name = deepseek_v4.checkpoint_name(name)
        if name is None:
            return None
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:  # MTP: model.layers.{L + k}.*
        k, rest = int(m.group(1)) - cfg.num_hidden_layers, m.group(2)
        if rest in _MTP_SHARED:
            return None
        name = f"mtp.{k}.{rest}" if rest.startswith(_MTP_OWN) else f"mtp.{k}.block.{rest}"
    if m := _EXPERT.match(name):
        return Target(f"{m.group(1)}.{m.group(3)}", index=int(m.group(2)))
    if m := _FUSED_EXPERTS.match(name):
        if m.group(2) == "down_proj":
            return Target(f"{m.group(1)}.down_proj")
        return Target(f"{m.group(1)}.gate_proj", half=0)  # the up half is handled alongside
    return Target(name)


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """W[r, c] = fp8(W)[r, c] * scale_inv[r // 128, c // 128], in fp32 (DeepSeek-V3 weight_dequant)."""
    rows, cols = w.shape
    s = scale_inv.float()
    s = s.repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]
    return w.float() * s


def scale_name(name: str, files) -> str | None:
    """The block scales of weight `name` in the checkpoint: `X.weight_scale_inv` (V3, transformers) or `X.scale`
    (the released V4 checkpoints: FP8 and FP4 alike; multiplied, as transformers' FP8 quantizer renames it)."""
    if name + "_scale_inv" in files:
        return name + "_scale_inv"
    if name.endswith(".weight") and (s := name.removesuffix("weight") + "scale") in files:
        return s
    return None


# Packed FP4 (e2m1 pairs) as the released V4 experts store it: int8 in the file (transformers' FP4 dtype too)
_FP4_DTYPES = (torch.int8, torch.uint8, getattr(torch, "float4_e2m1fn_x2", torch.int8))
_FP4_ST_DTYPES = ("I8", "U8")


def fp8_packed_bits(files: dict[str, Path], cfg: ModelConfig):
    """For quantize_model (and deepseek_v4.pack_experts): our parameter name -> "fp8" / "fp4" for the checkpoint's
    FP8 / FP4 weights (those with a scale, see `scale_name`), so they are kept packed (models/quant.py pack_fp8,
    pack_fp4) and not dequantized; None if none. FP4 is told by the weight's dtype in the file's header."""
    packed: dict[str, str] = {}
    headers: dict[Path, dict] = {}
    fp8_packs = (cfg.fp8.block_size if cfg.fp8 else (128, 128))[1] == 128  # the kernels' scale blocks: 128 columns
    for name in files:
        target = target_of(name, cfg) if scale_name(name, files) else None
        if target is None or target.half is not None:  # fused gate_up stacks: dequantized (not split here)
            continue
        f = files[name]
        if f not in headers:
            h = _open(f)
            headers[f] = h.entries
            h.close()
        if headers[f][name]["dtype"] in _FP4_ST_DTYPES:
            packed[target.param] = "fp4"
        elif fp8_packs:
            packed[target.param] = "fp8"
    return packed.get if packed else None


def _pack(fmt: str, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> kernels.Packed:
    return pack_fp8(w, scale, block) if fmt == "fp8" else pack_fp4(w, scale)


def _put_packed(dest: tuple[str, object], target: Target, fmt: str, w: torch.Tensor, scale: torch.Tensor,
                block: tuple[int, int], loaded: set[str]) -> bool:
    """An FP8 / FP4 weight into a layer that keeps that format (its bytes and scales as they are); False for a
    float layer."""
    kind, obj = dest
    if getattr(obj, "bits", None) != fmt:
        return False
    with torch.no_grad():
        if kind == "quant":
            obj.set_packed(_pack(fmt, w, scale, block))
            loaded.add(target.param)
        elif target.index is not None:
            obj.set_packed(target.index, _pack(fmt, w, scale, block))
            loaded.add(f"{target.param}[{target.index}]")
        else:  # a whole [E, out, in] stack with [E, ...] scales
            for e in range(w.shape[0]):
                obj.set_packed(e, _pack(fmt, w[e], scale[e], block))
                loaded.add(f"{target.param}[{e}]")
    return True


def _check_scale(f: Path, name: str, scale: str, fmt: str, w: torch.Size, got: torch.Size,
                 block: tuple[int, int]) -> None:
    """FP8: one scale per block[0] x block[1] block; FP4 ([out, in / 2] bytes): one per 32 values of a row."""
    rows, cols = w[-2], w[-1]
    want = (*w[:-2], -(-rows // block[0]), -(-cols // block[1])) if fmt == "fp8" else (*w[:-2], rows, cols // 16)
    if tuple(got) != want:
        raise CheckpointError(f"{f}: scale {scale!r} of {fmt} tensor {name!r} {list(w)} has shape {list(got)}, "
                              f"expected {list(want)}")


def destinations(model: CausalLM) -> dict[str, tuple[str, object]]:
    """Where a (Hugging Face named) tensor can go: a float parameter, a quantized linear layer ("P.weight"),
    a quantized expert stack ("...experts.gate_proj"), or a pre-quantized buffer ("P.qweight" / scales / mins)."""
    dest: dict[str, tuple[str, object]] = {n: ("param", p) for n, p in model.named_parameters(remove_duplicate=False)}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, QuantLinear):
            dest[f"{name}.weight"] = ("quant", m)
        elif isinstance(m, QuantStack):
            dest[name] = ("stack", m)
    for name, b in model.named_buffers(remove_duplicate=False):
        if name.endswith((".qweight", ".scales", ".mins")):
            dest[name] = ("buffer", b)
    return dest


def load_weights(model: CausalLM, path: Path, progress: bool = True) -> None:
    cfg = model.config
    dest = destinations(model)
    files = checkpoint_files(path)
    loaded: set[str] = set()
    handles: dict[Path, object] = {}

    def read(name: str) -> torch.Tensor:
        f = files[name]
        if f not in handles:
            handles[f] = _open(f)
        try:
            return handles[f].get_tensor(name)
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f}: cannot read tensor {name!r} ({e})") from None

    # One shard at a time, closing each when done, so at most one shard's pages stay mapped.
    by_file: dict[Path, list[str]] = {}
    scales = {s for n in files if (s := scale_name(n, files))}  # read with their weights
    for n in files:
        if n not in scales and not _SKIPPED.match(n):
            by_file.setdefault(files[n], []).append(n)
    bar = tqdm(total=sum(map(len, by_file.values())), desc="Loading weights", unit="tensor",
               disable=not progress, leave=False)
    for names in by_file.values():
        for name in names:
            _load_one(name, model, dest, files, read, loaded)
            bar.update()
        for h in handles.values():
            h.close()
        handles.clear()
    bar.close()

    if cfg.num_nextn_predict_layers and not any(n.startswith("mtp.") for n in loaded):
        model.mtp = torch.nn.ModuleList()  # checkpoint saved without its MTP layer (transformers drops it)
    _check_complete(model, loaded, path)


def _load_one(name: str, model: CausalLM, dest: dict, files: dict, read, loaded: set[str]) -> None:
    """Put checkpoint tensor `name` in place (dequantizing FP8, splitting fused experts, quantizing if asked)."""
    cfg = model.config
    target = target_of(name, cfg)
    if target is None:
        return
    if target.param not in dest:
        raise CheckpointError(f"{files[name]}: unexpected tensor {name!r} for a {cfg.model_type} model")
    shard = getattr(model, "shard", None)  # selfseek/distributed: this rank keeps only its slice
    if shard is not None and not shard.owns(target.param, target.index):
        return
    t = read(name)
    s_name = scale_name(name, files)
    if t.dtype == torch.float8_e4m3fn or (s_name is not None and t.dtype in _FP4_DTYPES):
        if s_name is None:
            raise CheckpointError(f"{files[name]}: FP8 tensor {name!r} has no {name + '_scale_inv'!r} (or "
                                  f"{name.removesuffix('weight') + 'scale'!r})")
        fmt = "fp8" if t.dtype == torch.float8_e4m3fn else "fp4"
        block = cfg.fp8.block_size if cfg.fp8 else (128, 128)
        scale = read(s_name)
        _check_scale(files[name], name, s_name, fmt, t.shape, scale.shape, block)
        if _put_packed(dest[target.param], target, fmt, t, scale, block, loaded):
            return
        if fmt == "fp8":
            t = dequantize_fp8(t, scale, block)
        else:  # a float layer (sharded, or not CPU): the e2m1 values times their scales, in fp32
            t = torch.stack([kernels.to_float(pack_fp4(w, s)) for w, s in zip(t.view(-1, *t.shape[-2:]),
                            scale.view(-1, *scale.shape[-2:]), strict=True)]).view(*t.shape[:-1], -1)
    if shard is not None:
        t, target.index = shard.narrow(target.param, target.index, target.half, t)
    f = files[name]
    kind, obj = dest[target.param]
    with torch.no_grad():
        if kind == "buffer":  # pre-quantized (`selfseek quantize`): stored as it is kept
            _check_shape(f, name, t.shape, obj.shape)
            obj.copy_(t)
            owner = target.param.rsplit(".", 1)[0]
            if dest.get(owner, ("",))[0] == "stack":
                loaded.update(f"{owner}[{e}]" for e in range(obj.shape[0]))
            else:
                loaded.add(owner + ".weight")
            return
        if kind == "quant":
            _check_shape(f, name, t.shape, (obj.out_features, obj.in_features))
            obj.set_from_float(t)
            loaded.add(target.param)
            return
        shape = obj.shape  # a parameter [E, out, in] or a QuantStack
        if target.half is not None:  # fused [E, 2I, M] gate_up_proj -> gate [E, I, M], up [E, I, M]
            _check_shape(f, name, t.shape, (shape[0], 2 * shape[1], shape[2]))
            up_name = target.param.replace("gate_proj", "up_proj")
            for half, pname in zip(t.chunk(2, dim=1), (target.param, up_name), strict=True):
                for e in range(shape[0]):
                    _put_expert(dest[pname], e, half[e])
                    loaded.add(f"{pname}[{e}]")
        elif target.index is not None:
            _check_shape(f, name, t.shape, shape[1:])
            if target.index >= shape[0]:
                raise CheckpointError(f"{f}: tensor {name!r} names expert {target.index}; the config has {shape[0]}")
            _put_expert(dest[target.param], target.index, t)
            loaded.add(f"{target.param}[{target.index}]")
        elif kind == "stack":
            _check_shape(f, name, t.shape, shape)
            for e in range(shape[0]):
                _put_expert(dest[target.param], e, t[e])
                loaded.add(f"{target.param}[{e}]")
        else:
            _check_shape(f, name, t.shape, shape)
            obj.copy_(t)
            loaded.add(target.param)


def _put_expert(dest: tuple[str, object], e: int, w: torch.Tensor) -> None:
    kind, obj = dest
    if kind == "stack":
        obj.set_from_float(e, w)
    else:
        obj[e].copy_(w)


def _check_shape(f: Path, name: str, got, expect) -> None:
    if tuple(got) != tuple(expect):
        raise CheckpointError(f"{f}: tensor {name!r} has shape {list(got)}, the config implies {list(expect)}")


def _check_complete(model: CausalLM, loaded: set[str], path: Path) -> None:
    missing = []
    for name, (kind, obj) in destinations(model).items():
        if kind == "buffer" or name in loaded:
            continue
        if kind == "stack" or name.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj")):
            absent = [e for e in range(obj.shape[0]) if f"{name}[{e}]" not in loaded]
            if absent:
                missing.append(f"{name} (experts {absent[:4]}{'...' if len(absent) > 4 else ''})")
        elif not (model.config.tie_word_embeddings and {name, "model.embed_tokens.weight", "lm_head.weight"} & loaded
                  and name in ("model.embed_tokens.weight", "lm_head.weight")):
            missing.append(name)
    if missing:
        shown = ", ".join(_hf_name(n, model.config) for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: checkpoint lacks tensor(s) {shown}{more}")


def _hf_name(name: str, cfg: ModelConfig) -> str:
    m = re.match(r"^mtp\.(\d+)\.(?:block\.)?(.*)$", name)
    return f"model.layers.{cfg.num_hidden_layers + int(m.group(1))}.{m.group(2)}" if m else name


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtypes(dtype: str | torch.dtype, cfg: ModelConfig,
                   device: str | torch.device = "cpu") -> tuple[torch.dtype, torch.dtype]:
    """The (storage, compute) dtypes of the float weights. "auto": stored in the checkpoint's 16-bit dtype (FP8
    checkpoints: bf16), else float32, computed as models/quant.py's `compute_dtype_for` rules for the device (fp32 on
    CPUs); an explicit dtype is both."""
    if isinstance(dtype, torch.dtype):
        return dtype, dtype
    if dtype == "auto":
        storage = torch.bfloat16 if cfg.fp8 is not None else _DTYPES.get(str(cfg.torch_dtype), torch.float32)
        return storage, compute_dtype_for(storage, device)
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype], _DTYPES[dtype]


def build_empty(
    cfg: ModelConfig, dtype: str | torch.dtype, device: str | torch.device = "cpu", bits: int | None = None,
    shard=None,
) -> CausalLM:
    """The model with uninitialised storage: parameters in the compute dtype (`resolve_dtypes`), the big float
    weights in the storage dtype when it differs, the MoE router kept in fp32, and with `bits` (8 or 4) the linear
    layers, experts and embedding quantized (models/quant.py)."""
    storage, compute = resolve_dtypes(dtype, cfg, device)
    with torch.device("meta"):
        model = deepseek_v4.DeepseekV4LM(cfg) if cfg.v4 is not None else CausalLM(cfg)
        if bits:
            quantize_model(model, bits)
            if cfg.v4 is not None and callable(bits):  # V4's clamped experts: packed FP4 / FP8 stacks
                deepseek_v4.pack_experts(model, bits)
        if shard is not None:  # a distributed.parallel.Sharding: this rank's part of each layer
            shard.apply(model)
    keep_fp32 = getattr(model, "KEEP_FP32", None)  # DeepSeek-V4: hyper-connection mixers, sinks, ... as its reference
    for name, p in model.named_parameters():
        if ".mlp.gate." not in name and not (keep_fp32 and keep_fp32.search(name)):
            p.data = p.data.to(compute)
    if storage != compute:
        keep_16bit_storage(model, storage)
    model = model.to_empty(device=device).eval().requires_grad_(False)
    if cfg.tie_word_embeddings:  # to_empty gives each module its own new tensor (meta -> device): tie again
        if isinstance(model.lm_head, QuantEmbedding):
            model.model.embed_tokens = model.lm_head
        else:
            model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_checkpoint(
    path: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    progress: bool = True,
    quantize: int | None = None,
    shard=None,
) -> CausalLM:
    """Load a Hugging Face checkpoint folder (config.json + safetensors) into a CausalLM; with `quantize`
    (8 or 4) each weight is quantized as it streams in, so the float model never exists in memory; with `shard`
    (distributed.parallel.Sharding) only this rank's slices are built and read."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    cfg = ModelConfig.from_file(path)
    bits = cfg.weight_bits or quantize
    if not bits and cfg.fp8 is not None and shard is None and torch.device(device).type == "cpu":
        bits = fp8_packed_bits(checkpoint_files(path), cfg)  # FP8 layers stay FP8 for the CPU kernels
    model = build_empty(cfg, dtype, device, bits, shard)
    load_weights(model, path, progress)
    return model
