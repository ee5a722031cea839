"""Building blocks shared by every family: RMSNorm, rotary embeddings, the SwiGLU MLP.

Shape letters used across models/: b batch, s query positions, t key positions, h heads,
k KV heads, g query heads per KV head, d head dim, r rope dim, c latent (kv_lora_rank) dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from selfseek.config import RopeConfig, yarn_mscale


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in fp32 and cast back before the weight (as HF does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is one fused op computing x * rsqrt(mean(x^2) + eps) (bitwise the eager formula in fp32)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # the same products, fewer ops
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def fused_rows(owner: nn.Module, parts: tuple[nn.Module, ...]) -> nn.Module | None:
    """Linear layers reading the same input (q/k/v, gate/up) as one layer whose output is theirs concatenated,
    or None where they cannot be fused: one GEMM (one kernel call, one pass over x) instead of several.

    The parts keep their names and parameters (loading, export, quantization and LoRA see them as before);
    their weights become row views of one concatenated tensor, made once (again only if a weight is replaced),
    so fusing costs no memory. Not while training their weights (gradients must reach the parameters) nor when a
    part is wrapped (LoRA) or of another class. The fused layer is kept on `owner`, not as a submodule."""
    cached = owner.__dict__.get("_fused_rows")
    if cached is not None and cached[1] == parts and not torch.is_grad_enabled():  # decode: the fast path
        store, names = cached[3]
        if [getattr(p, store)[n].data_ptr() for p in parts for n in names] == cached[2]:
            return cached[0]
    from selfseek.models.quant import QuantLinear

    first = parts[0]
    if all(type(p) is nn.Linear for p in parts):
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
        ptrs = [getattr(p, store)[n].data_ptr() for p in parts for n in names]
        cached = (fused, parts, ptrs, (store, names))
        owner.__dict__["_fused_rows"] = cached
    return cached[0]


def _fuse_rows(parts: tuple[nn.Module, ...], names: tuple[str, ...], store: str) -> nn.Module:
    from selfseek.models.quant import QuantLinear

    first, out = parts[0], sum(p.out_features for p in parts)
    with torch.inference_mode(False), torch.no_grad():
        if store == "_parameters":
            fused = nn.Linear(first.in_features, out, bias="bias" in names, device="meta")
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
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = fused(x).split([self.gate_proj.out_features, self.up_proj.out_features], dim=-1)
        return self.down_proj(F.silu(gate) * up)


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
