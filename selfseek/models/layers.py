"""Building blocks shared by every family: RMSNorm, rotary embeddings, the SwiGLU MLP.

Shape letters used across models/: b batch, s query positions, t key positions, h heads,
k KV heads, g query heads per KV head, d head dim, r rope dim, c latent (kv_lora_rank) dim.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as nn_module

from selfseek import kernels
from selfseek.config import RopeConfig, yarn_mscale
from selfseek.kernels.fused_ops import add_rms_norm, silu_mul
from selfseek.kernels.fused_ops import rope as fused_rope


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in fp32 and cast back before the weight (as HF does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if x.dim() == 2:  # rows (MLA's q_a/kv_a latents, the final norm): one kernel call (F.rms_norm is a
                return add_rms_norm(None, x, self.weight, self.eps)  # composite of ~15 ops on the CPU)
            # F.rms_norm computes x * rsqrt(mean(x^2) + eps) (bitwise the eager formula in fp32)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def global_hooks() -> bool:
    """Whether forward hooks are registered for every module (nn.modules.module.register_module_forward_hook)."""
    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


def hooked(module: nn.Module) -> bool:
    """Whether calling the module runs forward hooks (its own or global ones: a profile's timers, LoRA's delta)."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or global_hooks()


def run_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x); a float32 nn.Linear on the CPU outside autograd and without hooks runs in the kernels instead
    (kernels.linear: the row kernels below GEMM_MIN_ROWS rows of x, torch.mm from there, as for packed weights).
    torch's sgemv and small sgemm (MKL) measured slower at every size below 32 rows on a Zen 4 EPYC, and did not
    use a second thread: 1024 x 1024 by 1 row 0.082 / 0.076 ms at 1 / 2 threads against the kernel's 0.081 / 0.037;
    the medium V3's 129280 x 1024 head by 4 rows 102 / 125 ms against 43 / 26. The native decode step
    (models/native_step.py) runs the same kernels, so float32 models take it too."""
    if type(layer) is not nn.Linear:  # first: another class's `weight` may be a property (QuantLinear dequantizes)
        return layer(x)
    w = layer.weight
    if (w.dtype == x.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous() and not hooked(layer)
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        y = kernels.linear(x, w)
        return y if layer.bias is None else y.add_(layer.bias)
    return layer(x)


def fused_rows(owner: nn.Module, parts: tuple[nn.Module, ...]) -> nn.Module | None:
    """Linear layers reading the same input (q/k/v, gate/up) as one layer whose output is theirs concatenated,
    or None where they cannot be fused: one GEMM (one kernel call, one pass over x) instead of several.

    The parts keep their names and parameters (loading, export, quantization and LoRA see them as before);
    their weights become row views of one concatenated tensor, made once (again only if a weight is replaced),
    so fusing costs no memory. Not while training their weights (gradients must reach the parameters) nor when a
    part is wrapped (training's LoRA) or of another class. The fused layer is kept on `owner`, not as a submodule.
    Served LoRA adapters on the parts (set_lora) are applied by the fused layer to each part's own columns."""
    cached = owner.__dict__.get("_fused_rows")
    if cached is not None and cached[1] == parts and not torch.is_grad_enabled():  # decode: the fast path
        store, names = cached[3]
        if [getattr(p, store)[n].data_ptr() for p in parts for n in names] == cached[2]:
            return cached[0]
    from selfseek.models.quant import HalfLinear, QuantLinear

    first = parts[0]
    if type(first) in (nn.Linear, HalfLinear) and all(type(p) is type(first) for p in parts):
        has_bias = first.bias is not None
        if any((p.bias is not None) != has_bias for p in parts):
            return None
        names = ("weight", "bias") if has_bias else ("weight",)
        store = "_parameters"
    elif all(type(p) is QuantLinear and p.bits == first.bits and (p.mins is None) == (first.mins is None)
             for p in parts):
        names = ("qweight", "scales") + (("mins",) if first.mins is not None else ())
        store = "_buffers"
    else:
        return None
    if any(p.in_features != first.in_features for p in parts):
        return None
    tensors = [getattr(p, store)[n] for p in parts for n in names]
    if tensors[0].device.type == "meta" or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return None
    # Checked by storage address: `.data =` and `.to()` keep a Parameter object but move its storage.
    if cached is None or cached[1] != parts or [t.data_ptr() for t in tensors] != cached[2]:
        fused = _fuse_rows(parts, names, store)
        if any("_lora" in p.__dict__ for p in parts):
            fused.__dict__["_lora_parts"] = parts
            fused.register_forward_hook(_fused_lora_hook)
        ptrs = [getattr(p, store)[n].data_ptr() for p in parts for n in names]
        cached = (fused, parts, ptrs, (store, names))
        owner.__dict__["_fused_rows"] = cached
    return cached[0]


def _fuse_rows(parts: tuple[nn.Module, ...], names: tuple[str, ...], store: str) -> nn.Module:
    from selfseek.models.quant import QuantLinear

    first, out = parts[0], sum(p.out_features for p in parts)
    with torch.inference_mode(False), torch.no_grad():
        if store == "_parameters":  # nn.Linear, or HalfLinear (16-bit storage)
            fused = type(first)(first.in_features, out, bias="bias" in names, device="meta")
        else:
            fused = QuantLinear(first.in_features, out, first.bits, first.mins is not None)
        for n in names:
            whole = torch.cat([getattr(p, n) for p in parts])
            row = 0
            for p in parts:
                view = whole[row : row + p.out_features]
                row += p.out_features
                if store == "_parameters":
                    getattr(p, n).data = view
                else:
                    setattr(p, n, view)
            if store == "_parameters":
                setattr(fused, n, nn.Parameter(whole, requires_grad=False))
            else:
                setattr(fused, n, whole)
    return fused


# ---- served LoRA adapters (models/lora_serving.py loads them) ---------------------------------------------
# A linear layer serving adapters keeps, per adapter index, (A^T [in, r], scale * B^T [r, out]) in its __dict__
# (not parameters: the weights' fingerprint, state_dict and export stay the base model's) and a forward hook that
# adds x A^T (s B^T) to the rows of the step's batch that use that adapter. Index 0 is the base model: no delta.


@dataclass
class LoRARows:
    """Which rows of one forward's flat batch [T, ...] use which adapter: (adapter index, rows) per adapter
    in use, rows a slice when they are consecutive (the usual case: a sequence's rows are), else an index
    tensor. Built once per step, read by every adapted layer."""

    num_rows: int
    groups: list[tuple[int, slice | torch.Tensor]]

    @classmethod
    def from_counts(cls, adapters: list[int], counts: list[int], device: torch.device | str = "cpu"
                    ) -> LoRARows | None:
        """Sequence i's counts[i] consecutive rows use adapters[i] (0: none); None when no row uses one."""
        if not any(adapters):
            return None
        rows: dict[int, list[tuple[int, int]]] = {}
        start = 0
        for a, n in zip(adapters, counts, strict=True):
            if a and n:
                spans = rows.setdefault(a, [])
                if spans and spans[-1][1] == start:
                    spans[-1] = (spans[-1][0], start + n)
                else:
                    spans.append((start, start + n))
            start += n
        groups: list[tuple[int, slice | torch.Tensor]] = []
        for a, spans in rows.items():
            if len(spans) == 1:
                groups.append((a, slice(*spans[0])))
            else:
                groups.append((a, torch.cat([torch.arange(s, e) for s, e in spans]).to(device)))
        return cls(start, groups)


_lora_state = threading.local()  # .rows: the LoRARows of the forward running in this thread, or None


@contextmanager
def lora_rows(rows: LoRARows | None) -> Iterator[None]:
    """Apply served adapters to the rows `rows` names during the forwards inside (None: base model only)."""
    before = getattr(_lora_state, "rows", None)
    _lora_state.rows = rows
    try:
        yield
    finally:
        _lora_state.rows = before


def set_lora(module: nn.Module, owner: nn.Module, index: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """Serve adapter `index` (> 0) on a linear layer: y += scale * B A x for the rows using it. a [r, in] and b
    [out, r] as PEFT stores them; `owner` is the module that may fuse this layer with others (its parent)."""
    if index <= 0:
        raise ValueError("adapter index 0 is the base model")
    out_features, in_features = module.out_features, module.in_features
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape[0] != out_features or (
            a.shape[0] != b.shape[1]):
        raise ValueError(f"LoRA shapes A {list(a.shape)}, B {list(b.shape)} do not fit a {in_features} -> "
                         f"{out_features} layer")
    loras = module.__dict__.setdefault("_lora", {})
    if not loras:
        module.register_forward_hook(_lora_hook)
    with torch.no_grad():
        loras[index] = (a.t().contiguous(), (b.t() * scale).contiguous())
    owner.__dict__.pop("_fused_rows", None)  # a fused layer made before must now apply the adapters: make it again


def _lora_hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    _add_lora(module.__dict__["_lora"], args[0], out)
    return out


def _fused_lora_hook(fused: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    loras = fused.__dict__.get("_lora")
    if loras is None:  # made on first use, from the parts' adapters (set_lora makes a new fused layer)
        loras = fused.__dict__["_lora"] = _fused_lora(fused.__dict__["_lora_parts"])
    _add_lora(loras, args[0], out)
    return out


def _fused_lora(parts: tuple[nn.Module, ...]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The parts' adapters as adapters of the fused layer: per adapter index, A^T of every part that has it side
    by side [in, sum r] and their s B^T block-diagonal [sum r, sum out], each B on its part's own columns (a part
    without that adapter gets zero columns): one pair of GEMMs per adapter for q/k/v or gate/up together."""
    total = sum(p.out_features for p in parts)
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.inference_mode(False), torch.no_grad():  # made during a step: plain tensors, usable outside it too
        for index in sorted({i for p in parts for i in p.__dict__.get("_lora", {})}):
            out[index] = _fused_pair(parts, index, total)
    return out


def _fused_pair(parts: tuple[nn.Module, ...], index: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapter `index` of the fused parts: their A^T side by side, their s B^T on the block diagonal."""
    a_cols, blocks, col = [], [], 0
    for p in parts:
        w = p.__dict__.get("_lora", {}).get(index)
        if w is not None:
            a_cols.append(w[0])
            blocks.append((col, w[1]))
        col += p.out_features
    a_t = torch.cat(a_cols, dim=1)
    b_t = a_t.new_zeros(a_t.shape[1], total)
    r0 = 0
    for col, b in blocks:
        b_t[r0 : r0 + b.shape[0], col : col + b.shape[1]] = b
        r0 += b.shape[0]
    return a_t, b_t


def _add_lora(loras: dict[int, tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, out: torch.Tensor) -> None:
    """out[rows] += x[rows] A^T (s B^T) for each adapter of the running batch on its rows."""
    rows = getattr(_lora_state, "rows", None)
    if rows is None:
        return
    if x.shape[0] != rows.num_rows or x.dim() != 2:
        raise RuntimeError(f"a LoRA batch of {rows.num_rows} rows met an input of shape {list(x.shape)}")
    for index, r in rows.groups:
        w = loras.get(index)
        if w is None:  # this adapter leaves this layer as it is
            continue
        a_t, b_t = w
        delta = ((x[r].to(a_t.dtype) @ a_t) @ b_t).to(out.dtype)
        if isinstance(r, slice):
            out[r].add_(delta)
        else:
            out.index_add_(0, r, delta)

class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_rows(self, (self.gate_proj, self.up_proj))
        if fused is None:
            return run_linear(self.down_proj, F.silu(run_linear(self.gate_proj, x)) * run_linear(self.up_proj, x))
        return run_linear(self.down_proj, silu_mul(run_linear(fused, x), self.gate_proj.out_features))


def rope_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for a `dim`-wide rotary slice and the factor that multiplies cos/sin.

    default: theta^(-2i/dim); linear: divided by `factor` (DeepSeek-Coder's x4);
    llama3: long wavelengths divided by `factor`, smooth in between;
    yarn (DeepSeek V2/V3, YaRN paper / DeepSeek `precompute_freqs_cis`): dimensions rotating fewer than
    beta_slow times over the original context are interpolated (divided by factor), more than beta_fast
    times are kept, with a linear ramp between.
    """
    # Explicitly on the CPU: models are built under torch.device("meta").
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    if rope.freq_factors is not None:  # a GGUF's rope_freqs.weight (Llama 3 scaling, as llama.cpp applies it)
        inv_freq = inv_freq / torch.tensor(rope.freq_factors, dtype=torch.float32, device="cpu")
    if rope.type == "default":
        return inv_freq, 1.0
    if rope.type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.type == "llama3":
        orig = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = orig / rope.low_freq_factor, orig / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (orig / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    assert rope.type == "yarn", rope.type
    f, orig = rope.factor, rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / f * ramp + inv_freq * (1 - ramp)
    if rope.attention_factor is not None:
        attn_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attn_factor = yarn_mscale(f, rope.mscale) / yarn_mscale(f, rope.mscale_all_dim)
    else:
        attn_factor = yarn_mscale(f)
    return inv_freq, attn_factor


class Rotary(nn.Module):
    """Rotary position embedding over the last dim of x.

    interleaved=True rotates pairs (x[2i], x[2i+1]) (DeepSeek MLA checkpoints, §3.5 of the notes);
    interleaved=False rotates (x[i], x[i + d/2]) (Llama / rotate_half layout).
    """

    def __init__(self, rope: RopeConfig, dim: int, interleaved: bool):
        super().__init__()
        # A plain attribute, not a buffer: weights are loaded into an empty (meta-built) model,
        # which would leave a buffer uninitialised.
        self.inv_freq, self.attn_factor = rope_inv_freq(rope, dim)
        self.interleaved = interleaved

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [b, s] -> cos, sin [b, s, d/2] in fp32."""
        angles = positions.float()[..., None] * self.inv_freq.to(positions.device)
        return angles.cos() * self.attn_factor, angles.sin() * self.attn_factor

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [b, s, ..., d] with cos/sin [b, s, d/2]; extra dims (heads) broadcast."""
        if (y := fused_rope(x, cos, sin, self.interleaved)) is not None:  # one kernel call, the same bits
            return y
        if not self.interleaved and x.dtype == torch.float32:
            # x * [cos, cos] + [x2, x1] * [-sin, sin]: the same products and sums as below (a - b == a + (-b)),
            # in 5 ops instead of 12, with the widened cos/sin made once per step for all layers
            cos_full, sin_signed = _rotate_half_tables(cos, sin, x.dim())
            x1, x2 = x.chunk(2, dim=-1)
            return x * cos_full + torch.cat((x2, x1), dim=-1) * sin_signed
        while cos.dim() < x.dim():
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        xf = x.float()
        if self.interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            y = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        else:
            x1, x2 = xf.chunk(2, dim=-1)
            y = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return y.to(x.dtype)


_rotate_half_cache: list = [None]  # (cos, sin, x.dim(), cos_full, sin_signed) of the last step: one entry


def _rotate_half_tables(cos: torch.Tensor, sin: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[cos, cos] and [-sin, sin] over the full head dim, broadcastable to an `ndim`-D x; cached by the identity of
    the step's cos/sin (the cache holds them, so an identity cannot be reused while cached)."""
    c = _rotate_half_cache[0]
    if c is not None and c[0] is cos and c[1] is sin and c[2] == ndim:
        return c[3], c[4]
    cos_full, sin_signed = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
    while cos_full.dim() < ndim:
        cos_full, sin_signed = cos_full.unsqueeze(-2), sin_signed.unsqueeze(-2)
    _rotate_half_cache[0] = (cos, sin, ndim, cos_full, sin_signed)
    return cos_full, sin_signed
