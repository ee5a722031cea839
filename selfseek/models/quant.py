"""Weight-only quantization: linear layers that keep their weights in 32-wide int8 or int4 blocks.

q8: w = d * q, q in [-127, 127] (GGUF Q8_0-like; an optional per-block offset m covers Q5_K's layout);
q4: w = d * q + m, q in [0, 15], two per byte (GGUF Q4_1-like; Q4_0 is m = -8d, Q4_K maps exactly).
Activations stay float; kernels are in selfseek/kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from selfseek import kernels

GROUP = 32


def quantize_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """float [out, in] -> (qweight, scales [out, in/32], mins or None). q8 symmetric, q4 asymmetric."""
    out_f, in_f = w.shape
    blocks = w.float().reshape(out_f, in_f // GROUP, GROUP)
    if bits == 8:
        d = blocks.abs().amax(-1) / 127
        q = torch.round(blocks / torch.where(d > 0, d, 1)[..., None]).clamp(-127, 127).to(torch.int8)
        return q.view(out_f, in_f), d.contiguous(), None
    if bits != 4:
        raise ValueError(f"bits must be 8 or 4, not {bits}")
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    d = (hi - lo) / 15
    q = torch.round((blocks - lo[..., None]) / torch.where(d > 0, d, 1)[..., None]).clamp(0, 15).to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)
    return packed.reshape(out_f, in_f // 2).contiguous(), d.contiguous(), lo.contiguous()


def can_quantize(in_features: int) -> bool:
    return in_features % GROUP == 0


class QuantLinear(nn.Module):
    """A bias-free linear layer over block-quantized weights (`bits` 8 or 4)."""

    def __init__(self, in_features: int, out_features: int, bits: int, has_mins: bool | None = None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        width = in_features if bits == 8 else in_features // 2
        qtype = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.empty(out_features, width, dtype=qtype))
        self.register_buffer("scales", torch.empty(out_features, in_features // GROUP))
        has_mins = bits == 4 if has_mins is None else has_mins
        self.register_buffer("mins", torch.empty(out_features, in_features // GROUP) if has_mins else None)

    def set_from_float(self, w: torch.Tensor) -> None:
        q, d, m = quantize_weight(w, self.bits)
        self.set_quantized(q, d, m)

    def set_quantized(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> None:
        self.qweight.copy_(q)
        self.scales.copy_(d)
        if m is not None:
            if self.mins is None:
                self.mins = torch.empty_like(self.scales)
            self.mins.copy_(m)
        elif self.mins is not None:
            self.mins = None

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (float32): for the absorbed MLA path and for export."""
        return kernels.dequantize(self.qweight, self.scales, self.mins, self.bits == 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.quant_linear(x, self.qweight, self.scales, self.mins, self.bits == 4).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


class QuantStack(nn.Module):
    """E experts' [out, in] weights of one projection, quantized: qweight [E, out, in or in/2]."""

    def __init__(self, n: int, in_features: int, out_features: int, bits: int):
        super().__init__()
        self.n, self.in_features, self.out_features, self.bits = n, in_features, out_features, bits
        width = in_features if bits == 8 else in_features // 2
        qtype = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.empty(n, out_features, width, dtype=qtype))
        self.register_buffer("scales", torch.empty(n, out_features, in_features // GROUP))
        self.register_buffer("mins", torch.empty(n, out_features, in_features // GROUP) if bits == 4 else None)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n, self.out_features, self.in_features)

    def set_from_float(self, index: int, w: torch.Tensor) -> None:
        q, d, m = quantize_weight(w, self.bits)
        self.qweight[index].copy_(q)
        self.scales[index].copy_(d)
        if m is not None:
            self.mins[index].copy_(m)

    def linear(self, index: int, x: torch.Tensor) -> torch.Tensor:
        m = None if self.mins is None else self.mins[index]
        return kernels.quant_linear(x, self.qweight[index], self.scales[index], m, self.bits == 4).to(x.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.n}, in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


class QuantEmbedding(QuantLinear):
    """A quantized [vocab, dim] matrix used both ways: row lookup (embedding) and, tied, as the output head."""

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1)
        m = None if self.mins is None else self.mins[flat]
        rows = kernels.dequantize(self.qweight[flat], self.scales[flat], m, self.bits == 4)
        return rows.to(dtype).view(*ids.shape, -1)


def quantize_model(model: nn.Module, bits: int, skip: tuple[str, ...] = ("kv_b_proj",)) -> nn.Module:
    """Swap linear layers, expert stacks and the embedding for quantized ones, in place.

    On a meta-device model this only changes the structure (the loader then fills it tensor by tensor);
    on a real model the float weights are quantized. kv_b_proj stays float: the absorbed MLA path folds it
    into the query and output (and it is small).
    """
    from selfseek.models.moe import Experts

    real = next(model.parameters()).device.type != "meta"
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name not in skip and can_quantize(child.in_features):
                q = QuantLinear(child.in_features, child.out_features, bits)
                if child.bias is not None:
                    continue  # biased (some Llama-shaped) projections stay float
                if real:
                    q.set_from_float(child.weight.detach())
                setattr(parent, name, q.to(child.weight.device) if real else q)
            elif isinstance(child, Experts):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    w = getattr(child, proj)
                    if not isinstance(w, nn.Parameter) or not can_quantize(w.shape[2]):
                        continue
                    stack = QuantStack(w.shape[0], w.shape[2], w.shape[1], bits)
                    if real:
                        for e in range(w.shape[0]):
                            stack.set_from_float(e, w[e].detach())
                    delattr(child, proj)
                    setattr(child, proj, stack)
    lm = getattr(model, "lm_head", None)
    if lm is not None and model.config.tie_word_embeddings and isinstance(lm, QuantLinear):
        emb = QuantEmbedding(lm.in_features, lm.out_features, bits)
        emb.qweight, emb.scales, emb.mins = lm.qweight, lm.scales, lm.mins
        model.lm_head = emb
        model.model.embed_tokens = emb  # one quantized matrix serves both ways
    return model
