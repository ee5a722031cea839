"""Weights kept in a compact storage format, computed in float: int8 / int4 blocks, or 16-bit floats.

q8: w = d * q, q in [-127, 127] (GGUF Q8_0-like; an optional per-block offset m covers Q5_1's layout);
q4: w = d * q + m, q in [0, 15], two per byte (GGUF Q4_1-like; Q4_0 is m = -8d).
Packed formats (`bits` a format name, kernels.FORMATS): a file's own encoding, read by the kernels as it is:
GGUF K-quants ("q2_k" .. "q6_k", the file's bytes), DeepSeek FP8 ("fp8": e4m3 with [128, 128] block scales,
`pack_fp8`) and FP4 ("fp4": e2m1 pairs with ue8m0 scales per 32, `pack_fp4`).
16-bit storage (`HalfLinear`, `HalfEmbedding`, `keep_16bit_storage`): a bf16/fp16 checkpoint keeps half the memory
while the model computes in fp32 (dtype="auto" on a CPU, see `compute_dtype_for`).
Activations stay float; kernels are in selfseek/kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from selfseek import kernels

GROUP = 32


def quantize_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """float [out, in] -> (qweight, scales [out, in/32], mins or None), scales and mins fp16 (as GGUF stores
    them). q8 symmetric, q4 asymmetric; the integers are rounded against the fp16 scale that will be used."""
    out_f, in_f = w.shape
    blocks = w.float().reshape(out_f, in_f // GROUP, GROUP)
    if bits == 8:
        d = (blocks.abs().amax(-1) / 127).half()
        q = torch.round(blocks / torch.where(d > 0, d, 1).float()[..., None]).clamp(-127, 127).to(torch.int8)
        return q.view(out_f, in_f), d.contiguous(), None
    if bits != 4:
        raise ValueError(f"bits must be 8 or 4, not {bits}")
    lo, hi = blocks.amin(-1).half(), blocks.amax(-1)
    d = ((hi - lo.float()) / 15).half()
    scaled = (blocks - lo.float()[..., None]) / torch.where(d > 0, d, 1).float()[..., None]
    q = torch.round(scaled).clamp(0, 15).to(torch.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)
    return packed.reshape(out_f, in_f // 2).contiguous(), d.contiguous(), lo.contiguous()


Bits = int | str  # 8 / 4 (int8 / int4 blocks), or a packed format name (kernels.FORMATS)


def can_quantize(in_features: int, bits: Bits = 8) -> bool:
    unit = kernels.FORMATS[bits][1] if isinstance(bits, str) else GROUP
    return in_features % unit == 0


def _packed_shapes(fmt: str, rows: int, cols: int) -> tuple[tuple[int, int], tuple[int, int], torch.dtype]:
    """(data shape, scales shape, scales dtype) of one [rows, cols] weight in a packed format."""
    if fmt not in kernels.FORMATS:
        raise ValueError(f"unknown packed format {fmt!r} (known: {', '.join(kernels.FORMATS)})")
    _, unit, unit_bytes = kernels.FORMATS[fmt]
    scales = {"fp8": ((rows, -(-cols // 128)), torch.float32), "fp4": ((rows, cols // 32), torch.uint8)}
    shape, dtype = scales.get(fmt, ((rows, 0), torch.uint8))
    return (rows, cols // unit * unit_bytes), shape, dtype


def pack_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> kernels.Packed:
    """A DeepSeek FP8 weight as the kernels read it, no values changed: `weight` float8_e4m3fn [out, in] and its
    `weight_scale_inv` [ceil(out / block[0]), ceil(in / block[1])], float32 (V3) or float8_e8m0fnu (ue8m0 scales,
    V3.1 / V4): w[r, c] = weight[r, c] * scale_inv[r // block[0], c // block[1]]. Scale rows are repeated per weight
    row (4 bytes per 128 weights) so the packed weight can be sliced and concatenated by rows."""
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise ValueError(f"fp8 weight must be a 2-D float8_e4m3fn tensor, got {weight.dtype} {list(weight.shape)}")
    if block[1] != 128:
        raise ValueError(f"fp8 block {list(block)}: the kernels take 128-column scale blocks")
    rows, cols = weight.shape
    want = (-(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"weight_scale_inv has shape {list(scale_inv.shape)}, a {list(weight.shape)} weight in "
                         f"{list(block)} blocks needs {list(want)}")
    scales = scale_inv.float().repeat_interleave(block[0], dim=0)[:rows].contiguous()
    return kernels.Packed("fp8", weight.contiguous().view(torch.uint8), scales, cols)


def _ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """ue8m0 scales as their exponent bytes (2^(e - 127)): from float8_e8m0fnu, uint8, or exact powers of two."""
    if scale.dtype == torch.float8_e8m0fnu:
        return scale.contiguous().view(torch.uint8)
    if scale.dtype == torch.uint8:
        return scale.contiguous()
    s = scale.float()
    e = torch.log2(s).round()
    if not torch.equal(torch.exp2(e), s) or (e < -127).any() or (e > 127).any():
        raise ValueError("fp4 scales must be powers of two (ue8m0)")
    return (e + 127).to(torch.uint8).contiguous()


def pack_fp4(weight: torch.Tensor, scale: torch.Tensor) -> kernels.Packed:
    """A DeepSeek-V4 FP4 weight as the kernels read it, no values changed: `weight` [out, in / 2] (int8, uint8 or
    float4_e2m1fn_x2: two e2m1 values per byte, the low nibble the even column) and `scale` [out, in / 32]
    (float8_e8m0fnu, or its exponent bytes as uint8): w[r, c] = e2m1(weight)[r, c] * scale[r, c // 32]."""
    if weight.element_size() != 1 or weight.dim() != 2 or weight.is_floating_point() and (
            weight.dtype != getattr(torch, "float4_e2m1fn_x2", None)):
        raise ValueError(f"fp4 weight must be 2-D packed bytes (int8 / uint8 / float4_e2m1fn_x2), got {weight.dtype}")
    rows, cols = weight.shape[0], weight.shape[1] * 2
    if tuple(scale.shape) != (rows, cols // 32):
        raise ValueError(f"fp4 scale has shape {list(scale.shape)}, a [{rows}, {cols}] weight needs "
                         f"[{rows}, {cols // 32}] (one per 32 values)")
    return kernels.Packed("fp4", weight.contiguous().view(torch.uint8), _ue8m0(scale), cols)


class QuantLinear(nn.Module):
    """A bias-free linear layer over block-quantized weights (`bits` 8 or 4) or a packed format (`bits` its name:
    buffers `qweight` = the packed bytes, `scales` = its scales, see kernels.Packed)."""

    def __init__(self, in_features: int, out_features: int, bits: Bits, has_mins: bool | None = None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        if isinstance(bits, str):
            data, scales, sdtype = _packed_shapes(bits, out_features, in_features)
            self.register_buffer("qweight", torch.empty(data, dtype=torch.uint8))
            self.register_buffer("scales", torch.empty(scales, dtype=sdtype))
            self.register_buffer("mins", None)
            return
        width = in_features if bits == 8 else in_features // 2
        qtype = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.empty(out_features, width, dtype=qtype))
        blocks = (out_features, in_features // GROUP)
        self.register_buffer("scales", torch.empty(blocks, dtype=torch.half))
        has_mins = bits == 4 if has_mins is None else has_mins
        self.register_buffer("mins", torch.empty(blocks, dtype=torch.half) if has_mins else None)

    @classmethod
    def from_packed(cls, w: kernels.Packed) -> QuantLinear:
        """A layer over a packed weight (`pack_fp8`, `pack_fp4`, or GGUF K-quant bytes), sharing its tensors."""
        with torch.device("meta"):
            layer = cls(w.cols, w.rows, w.format)
        layer.set_packed(w)
        return layer

    def set_packed(self, w: kernels.Packed, row0: int = 0) -> None:
        """Rows row0.. of a packed-format layer from a packed weight of the same format (a whole weight by
        default; a meta-device layer takes the tensors themselves)."""
        if w.format != self.bits or w.cols != self.in_features:
            raise ValueError(f"a {w.format} weight of {w.cols} columns does not fit a {self.bits} layer of "
                             f"{self.in_features}")
        if row0 + w.rows > self.out_features:
            raise ValueError(f"{w.rows} rows from row {row0} do not fit a layer of {self.out_features}")
        if self.qweight.device.type == "meta" and row0 == 0 and w.rows == self.out_features:
            self.qweight, self.scales = w.data, w.scales
            return
        rows = slice(row0, row0 + w.rows)
        self.qweight[rows] = w.data
        self.scales[rows] = w.scales

    def set_from_float(self, w: torch.Tensor, row0: int = 0) -> None:
        """Quantize float rows into rows row0.. of this layer (all of it by default)."""
        if isinstance(self.bits, str):
            raise TypeError(f"a {self.bits} layer holds its file's encoding; fill it with set_packed")
        q, d, m = quantize_weight(w, self.bits)
        rows = slice(row0, row0 + w.shape[0])
        self.qweight[rows] = q
        self.scales[rows] = d
        if m is not None:
            self.mins[rows] = m

    @property
    def packed(self) -> kernels.Weight:
        if isinstance(self.bits, str):
            return kernels.Packed(self.bits, self.qweight, self.scales, self.in_features)
        return (self.qweight, self.scales, self.mins)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (float32): for the absorbed MLA path and for export."""
        return kernels.to_float(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._buffers
        key = (b["qweight"], b["scales"], b["mins"])
        # The kernel view is made once per set of buffers: loading copies into them in place, and anything that
        # replaces one (`.to()`, fusing rows, setattr) makes new tensor objects, so identity says it still holds.
        cached = self.__dict__.get("_prepared")
        if cached is None or cached[0][0] is not key[0] or cached[0][1] is not key[1] or (
                cached[0][2] is not key[2]):
            w = self.packed
            cached = (key, kernels.prepare(w), w)
            self.__dict__["_prepared"] = cached
        y = kernels.linear(x, cached[2], cached[1])
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


class QuantStack(nn.Module):
    """E experts' [out, in] weights of one projection, quantized: qweight [E, out, in or in/2], or in a packed
    format (`bits` its name; qweight [E, out, row bytes], scales as kernels.Packed describes, per expert)."""

    def __init__(self, n: int, in_features: int, out_features: int, bits: Bits):
        super().__init__()
        self.n, self.in_features, self.out_features, self.bits = n, in_features, out_features, bits
        if isinstance(bits, str):
            data, scales, sdtype = _packed_shapes(bits, out_features, in_features)
            self.register_buffer("qweight", torch.empty(n, *data, dtype=torch.uint8))
            self.register_buffer("scales", torch.empty(n, *scales, dtype=sdtype))
            self.register_buffer("mins", None)
            return
        width = in_features if bits == 8 else in_features // 2
        qtype = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.empty(n, out_features, width, dtype=qtype))
        blocks = (n, out_features, in_features // GROUP)
        self.register_buffer("scales", torch.empty(blocks, dtype=torch.half))
        self.register_buffer("mins", torch.empty(blocks, dtype=torch.half) if bits == 4 else None)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n, self.out_features, self.in_features)

    @classmethod
    def from_fp4(cls, weights: list[torch.Tensor] | torch.Tensor, scales: list[torch.Tensor] | torch.Tensor
                 ) -> QuantStack:
        """DeepSeek-V4 routed experts of one projection (w1, w2 or w3) from the checkpoint's per-expert tensors
        (`pack_fp4`'s weight and scale, in expert order), or the same stacked as [E, out, in / 2], [E, out, in / 32]."""
        packed = [pack_fp4(w, s) for w, s in zip(weights, scales, strict=True)]
        stack = cls(len(packed), packed[0].cols, packed[0].rows, "fp4")
        for e, p in enumerate(packed):
            stack.set_packed(e, p)
        return stack

    def set_packed(self, index: int, w: kernels.Packed, row0: int = 0) -> None:
        """Rows row0.. of expert `index` from a packed weight of this stack's format."""
        if w.format != self.bits or w.cols != self.in_features:
            raise ValueError(f"a {w.format} weight of {w.cols} columns does not fit a {self.bits} stack of "
                             f"{self.in_features}")
        if row0 + w.rows > self.out_features:
            raise ValueError(f"{w.rows} rows from row {row0} do not fit a stack of {self.out_features}")
        rows = slice(row0, row0 + w.rows)
        self.qweight[index, rows] = w.data
        self.scales[index, rows] = w.scales

    def set_from_float(self, index: int, w: torch.Tensor, row0: int = 0) -> None:
        if isinstance(self.bits, str):
            raise TypeError(f"a {self.bits} stack holds its file's encoding; fill it with set_packed")
        q, d, m = quantize_weight(w, self.bits)
        rows = slice(row0, row0 + w.shape[0])
        self.qweight[index, rows] = q
        self.scales[index, rows] = d
        if m is not None:
            self.mins[index, rows] = m

    @property
    def packed(self) -> kernels.Weight:
        """The whole stack as the kernels take it (kernels.moe)."""
        if isinstance(self.bits, str):
            return kernels.Packed(self.bits, self.qweight, self.scales, self.in_features)
        return (self.qweight, self.scales, self.mins)

    def expert(self, index: int) -> kernels.Weight:
        """Expert `index`'s [out, in] weight, as the kernels take it (views, no copy)."""
        if isinstance(self.bits, str):
            return self.packed[index]
        return (self.qweight[index], self.scales[index], None if self.mins is None else self.mins[index])

    def linear(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.expert(index)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.n}, in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def _interleavable(layer: QuantLinear | QuantStack) -> bool:
    return (layer.bits == 8 and layer.mins is None and layer.out_features % 16 == 0
            and layer.qweight.device.type == "cpu")


def interleave(layer: QuantLinear | QuantStack) -> bool:
    """Re-store a q8 layer or stack (no offsets, out_features a multiple of 16, on the CPU) in the q8_0x16 layout the
    int8 products read without transposing (kernels.interleave_q8): the same values and bytes in another order, read
    by every kernel (and the torch fallback) but no longer filled by rows. False when it is not such a weight."""
    if not _interleavable(layer):
        return False
    lead, rows, cols = layer.qweight.shape[:-2], layer.out_features, layer.in_features
    q, d = layer.qweight.reshape(-1, rows, cols), layer.scales.reshape(-1, rows, cols // GROUP)
    data = torch.empty(q.shape[0], rows, cols // GROUP * 34, dtype=torch.uint8)
    for e in range(q.shape[0]):  # an expert at a time: the copy's peak is one expert's bytes
        data[e] = kernels.interleave_q8(q[e], d[e])
    layer.qweight = data.view(*lead, rows, -1)
    layer.scales = torch.empty(*lead, rows, 0, dtype=torch.uint8)
    layer.bits = "q8_0x16"
    return True


def interleave_q8_weights(model: nn.Module) -> int:
    """Give the model's q8 products the q8_0x16 layout where the int8 products read it fast (kernels.interleaves_q8):
    the serving engine's start-up. Not kv_b_proj (MLA reads it per head, at row offsets inside the 16-row groups) nor
    an embedding that is only looked up. The number of weights changed."""
    if not kernels.interleaves_q8():
        return 0
    head, changed = getattr(model, "lm_head", None), 0
    for parent in model.modules():
        # Siblings reading the same input (q/k/v, gate/up, q_a/kv_a) are fused by rows (layers.fused_rows) only in
        # one format: all of them or none.
        groups: dict[int, list[QuantLinear | QuantStack]] = {}
        for name, m in parent.named_children():
            if (isinstance(m, (QuantLinear, QuantStack)) and name != "kv_b_proj"
                    and (type(m) is not QuantEmbedding or m is head)):
                groups.setdefault(m.in_features, []).append(m)
        for group in groups.values():
            if all(map(_interleavable, group)):
                changed += sum(map(interleave, group))
    return changed


class QuantEmbedding(QuantLinear):
    """A quantized [vocab, dim] matrix used both ways: row lookup (embedding) and, tied, as the output head."""

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return kernels.gather_rows(self.packed, ids).to(dtype)


def quantize_model(
    model: nn.Module, bits: int | Callable[[str], int | None], skip: tuple[str, ...] = ("kv_b_proj", "weights_proj")
) -> nn.Module:
    """Swap linear layers, expert stacks and the embedding for quantized ones, in place.

    `bits`: 8 or 4 for every layer, or a function of the parameter name ("...q_proj.weight",
    "...experts.gate_proj") giving 8, 4, a packed format name (kernels.FORMATS: an empty layer the loader fills
    with the file's bytes) or None (stay float), e.g. from a GGUF file's tensor types.
    On a meta-device model this only changes the structure (the loader then fills it tensor by tensor);
    on a real model the float weights are quantized. kv_b_proj stays float: the absorbed MLA path folds it
    into the query and output (and it is small); so does the V3.2 indexer's weights_proj, which DeepSeek's
    reference keeps in fp32 (its head weights decide which tokens are attended).
    """
    from selfseek.models.moe import Experts

    bits_of = bits if callable(bits) else (lambda name: bits)
    real = next(model.parameters()).device.type != "meta"
    tied = model.config.tie_word_embeddings
    for path, parent in list(model.named_modules()):
        prefix = f"{path}." if path else ""
        for name, child in list(parent.named_children()):
            if tied and child is model.lm_head:
                continue  # the shared matrix is handled below
            if isinstance(child, nn.Linear) and name not in skip and child.bias is None:
                b = bits_of(f"{prefix}{name}.weight")
                if not b or not can_quantize(child.in_features, b):
                    continue
                q = QuantLinear(child.in_features, child.out_features, b)
                if real:
                    q.set_from_float(child.weight.detach())
                setattr(parent, name, q.to(child.weight.device) if real else q)
            elif isinstance(child, Experts):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    w = getattr(child, proj)
                    b = bits_of(f"{prefix}{name}.{proj}")
                    if not b or not isinstance(w, nn.Parameter) or not can_quantize(w.shape[2], b):
                        continue
                    stack = QuantStack(w.shape[0], w.shape[2], w.shape[1], b)
                    if real:
                        for e in range(w.shape[0]):
                            stack.set_from_float(e, w[e].detach())
                    delattr(child, proj)
                    setattr(child, proj, stack)
    # The embedding: quantized rows are dequantized on lookup; tied to the head, one matrix serves both ways.
    emb = model.model.embed_tokens
    b = bits_of("model.embed_tokens.weight") or (tied and bits_of("lm_head.weight"))
    if isinstance(emb, nn.Embedding) and b and can_quantize(emb.embedding_dim, b):
        q = QuantEmbedding(emb.embedding_dim, emb.num_embeddings, b)
        if real:
            q.set_from_float(emb.weight.detach())
        model.model.embed_tokens = q
        if tied:
            model.lm_head = q
    return model


# ---------------------------------------------------------------- 16-bit storage, fp32 compute


def compute_dtype_for(storage: torch.dtype, device: str | torch.device) -> torch.dtype:
    """The rule behind dtype="auto": the compute dtype for float weights stored in `storage` on `device`.

    GPUs compute in the checkpoint's 16-bit dtype. CPUs compute in fp32 and keep 16-bit weights in 16-bit storage
    (widened per tile inside the kernels), so memory stays halved: without native bf16/fp16 (AVX2) 16-bit compute
    is emulated, ~5x slower; with it (AVX512-BF16/AMX) fp32 compute still decodes faster, measured on a 4096x4096
    bf16 weight, one row, one thread: 2.2 ms (kernels.linear, fp32 compute) against 3.1 ms (torch bf16 matmul).
    """
    if storage == torch.float32 or torch.device(device).type != "cpu":
        return storage
    return torch.float32


class HalfLinear(nn.Linear):
    """nn.Linear with its weight in bf16/fp16 storage and fp32 compute (the bias, if any, in the compute dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.linear(x, self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


class HalfEmbedding(nn.Embedding):
    """nn.Embedding with its rows in bf16/fp16 storage, looked up as fp32."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()


_HALF_CLASSES: dict[type, type] = {}  # a float module's class -> its 16-bit-storage, fp32-compute form


def register_16bit_storage(cls: type, half: type) -> None:
    """Let `keep_16bit_storage` give modules of exactly `cls` the 16-bit form `half` (whose `weight` may be
    bf16/fp16 and which computes in fp32, as HalfLinear and HalfEmbedding do): e.g. the tensor-parallel vocabulary
    layers of selfseek/distributed/parallel.py."""
    _HALF_CLASSES[cls] = half


def keep_16bit_storage(model: nn.Module, storage: torch.dtype, skip: tuple[str, ...] = ("kv_b_proj",)) -> nn.Module:
    """Put the big float weights (linear layers, expert stacks, the embedding, registered layers) in `storage`, in
    place; the rest (norms, biases, router, kv_b_proj which the absorbed MLA path folds into fp32 queries) stays as
    it is. Meant for the empty (meta) model before loading, so the weights load straight into 16-bit storage."""
    from selfseek.models.moe import Experts

    for module in model.modules():
        for name, child in module.named_children():
            half = _HALF_CLASSES.get(type(child))
            if half is not None and name not in skip:
                child.__class__ = half
                child.weight.data = child.weight.data.to(storage)
            elif isinstance(child, Experts):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    w = getattr(child, proj)
                    if isinstance(w, nn.Parameter):
                        w.data = w.data.to(storage)
    return model


register_16bit_storage(nn.Linear, HalfLinear)
register_16bit_storage(nn.Embedding, HalfEmbedding)


def describe_dtypes(model: nn.Module) -> str:
    """One line for start-up: how the weights are stored and what the model computes in."""
    stored: dict[str, int] = {}
    seen: set[int] = set()
    for m in model.modules():
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
            if t is None or id(t) in seen:  # a tied matrix once
                continue
            seen.add(id(t))
            if isinstance(m, QuantLinear | QuantStack):
                key = m.bits if isinstance(m.bits, str) else f"q{m.bits}"
            else:
                key = str(t.dtype).removeprefix("torch.")
            stored[key] = stored.get(key, 0) + t.nbytes
    parts = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in sorted(stored.items(), key=lambda kv: -kv[1]))
    compute = str(getattr(model, "dtype", torch.float32)).removeprefix("torch.")
    return f"weights stored as {parts}; compute in {compute}"
