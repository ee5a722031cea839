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
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
