"""Native CPU kernels (kernels/quant.cpp, built per instruction set by kernels/build.py, loaded with ctypes).

`quant_linear` / `dequantize` run block-quantized weights, `linear` float weights kept in 16-bit storage, and
`moe` the fused routed experts, all with float32 activations and results. A weight is a float tensor (float32,
bfloat16, float16), a block-quantized one given as (qweight, scales, mins): int8 -> q8, uint8 -> q4, or a `Packed`
weight in a file's own encoding (GGUF K-quants, DeepSeek FP8 / FP4; see quant.cpp). Where the library is not loaded
(SELFSEEK_NO_KERNELS=1, no compiler, not x86) or the tensors are not on the CPU, the same math runs in plain torch.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch

from selfseek.kernels import build

QuantWeight = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # (qweight, fp16 scales, fp16 mins or None)
# format -> (quant.cpp kind, values per unit, bytes per unit of the data)
FORMATS = {"q2_k": (5, 256, 84), "q3_k": (6, 256, 110), "q4_k": (7, 256, 144), "q5_k": (8, 256, 176),
           "q6_k": (9, 256, 210), "fp8": (10, 32, 32), "fp4": (11, 32, 16), "q8_0x16": (12, 32, 34)}


@dataclass(frozen=True)
class Packed:
    """A weight the kernels read in its file's encoding, never widened: `data` uint8 [..., rows, row_bytes].

    q2_k .. q6_k: GGUF K-quant super-blocks as in the file (scales: an empty [..., rows, 0] tensor, so row slices and
    row concatenation work as for the other buffers). fp8: e4m3 bytes [rows, cols], scales float32
    [rows, ceil(cols / 128)]: w = e4m3 * s (DeepSeek's [128, 128] block scales, one row of them per weight row).
    fp4: e2m1 pairs [rows, cols / 2], low nibble = even column, scales uint8 ue8m0 exponents [rows, cols / 32]:
    w = e2m1 * 2^(e - 127). q8_0x16: q8 weights (int8 values, fp16 scales) with each 16 rows interleaved for the
    int8 products (`interleave_q8`; rows a multiple of 16, sliced in whole groups).
    An expert stack has one more leading dimension ([E, rows, ...]); `w[e]` is expert e."""

    format: str
    data: torch.Tensor
    scales: torch.Tensor
    cols: int

    @property
    def rows(self) -> int:
        return self.data.shape[-2]

    def __getitem__(self, e: int) -> Packed:
        """Expert e of a stack."""
        return Packed(self.format, self.data[e], self.scales[e], self.cols)


Weight = torch.Tensor | QuantWeight | Packed
# From this many rows of x on, a quantized product is compute-bound: dequantize a tile of weight rows at a time
# into a cache-sized buffer and multiply it with torch's sgemm (never a whole-weight float copy), or where the
# kernels' float panels measured faster (build.panels_for_gemm) keep the row kernel.
GEMM_MIN_ROWS = 64
TILE_VALUES = 1 << 20  # weight values per dequantized tile (4 MiB of fp32: best measured of 1-16 MiB)
# Opt-in (SELFSEEK_INT8_ACTIVATIONS=1): products of q8/q4 and Q4_K / Q5_K / Q6_K weights with at most int8_max_rows()
# rows of x (any count with VNNI, decode batches without) quantize x per 32-block to int8 and use integer dot products
# (quant.cpp, selfseek_linear_int8). Faster, but x is rounded to 8 bits, so results are no longer the float product:
# off by default.
INT8_ACTIVATIONS = os.environ.get("SELFSEEK_INT8_ACTIVATIONS", "0") == "1"
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3, torch.uint8: 4}
# selfseek_linear_int8's kinds
INT8_KINDS = frozenset((3, 4, *(FORMATS[f][0] for f in ("q4_k", "q5_k", "q6_k", "q8_0x16"))))
_c_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p


class _Mat(ctypes.Structure):
    """quant.cpp's `Mat`: one [rows, cols] weight or a stack of them."""

    _fields_ = [("kind", ctypes.c_int32), ("rows", _c_i64), ("cols", _c_i64),
                ("data", _ptr), ("scales", _ptr), ("mins", _ptr), ("stride", _c_i64), ("sstride", _c_i64)]


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the C signatures of a loaded quant library (any level)."""
    mat = ctypes.POINTER(_Mat)
    lib.selfseek_linear.argtypes = [mat, _ptr, _c_i64, _c_i64, _ptr, _c_i64]
    lib.selfseek_linear_int8.argtypes = [mat, _ptr, _c_i64, _c_i64, _ptr, _c_i64]
    lib.selfseek_dequantize.argtypes = [mat, _c_i64, _c_i64, _ptr]
    lib.selfseek_gather_rows.argtypes = [mat, _ptr, _c_i64, _ptr]
    lib.selfseek_int8_max_rows.argtypes, lib.selfseek_int8_max_rows.restype = [], _c_i64
    lib.selfseek_q8x16_native.argtypes, lib.selfseek_q8x16_native.restype = [], ctypes.c_int
    for f in (lib.selfseek_moe, lib.selfseek_moe_int8):
        f.argtypes = [_ptr, _c_i64, _c_i64, _ptr, _ptr, _c_i64, _c_i64, mat, mat, mat, _ptr, ctypes.c_float]
    for f in (lib.selfseek_heads, lib.selfseek_heads_int8):
        f.argtypes = [mat, _ptr, _c_i64, _c_i64, _c_i64, _c_i64, _c_i64, ctypes.c_int32, _ptr]
    for f in (lib.selfseek_linear, lib.selfseek_linear_int8, lib.selfseek_dequantize,
              lib.selfseek_gather_rows, lib.selfseek_moe, lib.selfseek_moe_int8, lib.selfseek_heads,
              lib.selfseek_heads_int8):
        f.restype = ctypes.c_int
    return lib


def _load() -> ctypes.CDLL | None:
    return build.load("quant", bind)


def available() -> bool:
    """Whether the native kernels are loaded (False: the torch fallback runs)."""
    return _load() is not None


def int8_max_rows() -> int:
    """The most rows of x the loaded level's int8 products take (quant.cpp's INT8_MAX_ROWS); 0 without kernels."""
    return lib.selfseek_int8_max_rows() if (lib := _load()) is not None else 0


def interleaves_q8() -> bool:
    """Whether q8 weights should take the q8_0x16 layout (models.quant.interleave_q8_weights): int8 activations on
    and a loaded level whose int8 products read it in vectors (VNNI; the others read it in scalar code, for
    correctness only)."""
    return INT8_ACTIVATIONS and (lib := _load()) is not None and bool(lib.selfseek_q8x16_native())


def takes_int8(w: Weight, rows: int) -> bool:
    """Whether products of `rows` rows of x with w take int8 activations (INT8_ACTIVATIONS, an INT8_KINDS weight)."""
    return INT8_ACTIVATIONS and not isinstance(w, torch.Tensor) and _kind(w) in INT8_KINDS and rows <= int8_max_rows()


def _native(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    return _load() if all(t.device.type == "cpu" for t in tensors) else None


def _split(w: Weight) -> QuantWeight:
    if isinstance(w, Packed):
        return (w.data, w.scales, None)
    return (w, None, None) if isinstance(w, torch.Tensor) else w


def _packed_mat(w: Packed, stacked: bool) -> _Mat:
    if w.format not in FORMATS:
        raise ValueError(f"packed format {w.format!r} is not one of {', '.join(FORMATS)}")
    kind, unit, unit_bytes = FORMATS[w.format]
    d, s = w.data, w.scales
    dims = 3 if stacked else 2
    if w.cols % unit:
        raise ValueError(f"{w.format} weight: in_features {w.cols} is not a multiple of {unit}")
    if w.format == "q8_0x16" and d.shape[-2] % 16:
        raise ValueError(f"q8_0x16 weight: {d.shape[-2]} rows is not a multiple of 16")
    if d.dtype != torch.uint8 or d.dim() != dims or not d.is_contiguous() or d.shape[-1] != w.cols // unit * unit_bytes:
        raise ValueError(f"{w.format} data must be contiguous uint8 {'[E, rows, ' if stacked else '[rows, '}"
                         f"{w.cols // unit * unit_bytes}], got {d.dtype} {list(d.shape)}")
    want = {"fp8": (torch.float32, -(-w.cols // 128)), "fp4": (torch.uint8, w.cols // 32)}.get(w.format,
                                                                                              (torch.uint8, 0))
    if s.dtype != want[0] or tuple(s.shape) != (*d.shape[:-1], want[1]) or not s.is_contiguous():
        raise ValueError(f"{w.format} scales must be contiguous {want[0]} {[*d.shape[:-1], want[1]]}, "
                         f"got {s.dtype} {list(s.shape)}")
    return _Mat(kind, d.shape[-2], w.cols, d.data_ptr(), s.data_ptr() if s.numel() else None, None,
                d.shape[1:].numel() * d.element_size() if stacked else 0,
                s.shape[1:].numel() * s.element_size() if stacked else 0)


def _mat(w: Weight, stacked: bool = False) -> _Mat:
    """A ctypes view of a weight ([out, in] or, stacked, [E, out, in]); checks what the C++ side assumes."""
    if isinstance(w, Packed):
        return _packed_mat(w, stacked)
    q, scales, mins = _split(w)
    kind = _KINDS.get(q.dtype)
    if kind is None:
        raise TypeError(f"weight dtype {q.dtype} is not one of {', '.join(map(str, _KINDS))}")
    if q.dim() != (3 if stacked else 2) or not q.is_contiguous():
        raise ValueError(f"weight must be a contiguous {'3' if stacked else '2'}-D tensor, got shape {list(q.shape)}")
    cols = q.shape[-1] * (2 if kind == 4 else 1)
    if kind >= 3:
        blocks = (*q.shape[:-1], cols // 32)
        if cols % 32:
            raise ValueError(f"quantized weight: in_features {cols} is not a multiple of 32")
        for name, t in (("scales", scales), ("mins", mins)):
            if t is not None and (t.dtype != torch.float16 or tuple(t.shape) != blocks or not t.is_contiguous()):
                raise ValueError(f"{name} must be contiguous float16 {list(blocks)}")
        if scales is None:
            raise ValueError("a quantized weight needs scales")
        if kind == 4 and mins is None:
            raise ValueError("a q4 weight needs mins")
    # one expert's bytes, from the shape (indexing an expert out is an op: moe() runs this per layer)
    e_stride = q.shape[1:].numel() * q.element_size() if stacked else 0
    s_stride = scales.shape[1:].numel() * scales.element_size() if stacked and scales is not None else 0
    return _Mat(kind, q.shape[-2], cols, q.data_ptr(), scales.data_ptr() if scales is not None
                else None, mins.data_ptr() if mins is not None else None, e_stride, s_stride)


def _check(rc: int, what: str) -> None:
    if rc:
        raise ValueError(f"{what}: the kernel rejected its arguments (code {rc})")


def _torch_dequantize(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> torch.Tensor:
    """The definition of the formats, in torch: the fallback, and what the kernels are tested against."""
    if q.dtype == torch.uint8:  # a block's 16 bytes hold values 0..15 in low nibbles, 16..31 in high nibbles
        b = q.view(*q.shape[:-1], -1, 16)
        v = torch.cat([b & 0x0F, b >> 4], dim=-1).float()
    else:
        v = q.view(*q.shape[:-1], -1, 32).float()
    w = v * scales.float()[..., None]
    if mins is not None:
        w = w + mins.float()[..., None]
    return w.flatten(-2)


_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _bits(t: torch.Tensor, shifts: list[int], width: int) -> torch.Tensor:
    """[..., n] bytes -> [..., len(shifts), n]: the `width`-bit field at each shift."""
    return (t[..., None, :].int() >> torch.tensor(shifts, dtype=torch.int32)[:, None]) & ((1 << width) - 1)


def _f16(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.float16).float()


def _k4_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and mins (llama.cpp's get_scale_min_k4)."""
    d, m, md = s[..., 0:4].int(), s[..., 4:8].int(), s[..., 8:12].int()
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], -1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], -1)
    return sc.float(), mn.float()


def interleave_q8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """q8 weights (int8 [..., rows, cols], fp16 scales [..., rows, cols / 32]; rows a multiple of 16) -> q8_0x16
    bytes [..., rows, cols / 32 * 34]: per group of 16 rows and 32-block, the 16 scales, then for t = 0..7 the
    4-byte groups t (values 4t .. 4t + 3) of rows 0..15. The same values, reordered (`_torch_unpack` inverts it)."""
    *lead, rows, cols = q.shape
    g, nb = rows // 16, cols // 32
    qb = q.reshape(*lead, g, 16, nb, 8, 4).movedim(-4, -2)  # [..., g, nb, 8, 16, 4]
    sb = scales.reshape(*lead, g, 16, nb).transpose(-1, -2)  # [..., g, nb, 16]
    blocks = torch.cat([sb.contiguous().view(torch.uint8), qb.reshape(*lead, g, nb, 512).view(torch.uint8)], -1)
    return blocks.reshape(*lead, rows, nb * 34)


def _torch_unpack(w: Packed) -> torch.Tensor:
    """The definition of the packed formats, in torch: float32 [..., rows, cols]."""
    kind, unit, unit_bytes = FORMATS[w.format]
    lead = w.data.shape[:-1]
    if w.format == "q8_0x16":
        *top, rows = lead
        blocks = w.data.reshape(*top, rows // 16, w.cols // 32, 544)
        d = _f16(blocks[..., :32]).reshape(*blocks.shape[:-1], 16)  # [..., g, nb, 16]
        q = blocks[..., 32:].contiguous().view(torch.int8).reshape(*blocks.shape[:-1], 8, 16, 4).float()
        v = q * d[..., None, :, None]  # [..., g, nb, 8, 16, 4]
        return v.movedim(-2, -4).reshape(*top, rows, w.cols)
    b = w.data.reshape(*lead, w.cols // unit, unit_bytes)
    if w.format == "fp8":
        s = w.scales.float().repeat_interleave(128, dim=-1)[..., : w.cols]
        return w.data.view(torch.float8_e4m3fn).float() * s
    if w.format == "fp4":
        v = torch.tensor(_E2M1)[torch.stack([b & 15, b >> 4], -1).long()].reshape(*lead, w.cols)
        return v * torch.exp2(w.scales.float() - 127).repeat_interleave(32, dim=-1)
    if w.format in ("q4_k", "q5_k"):
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = _k4_scales(b[..., 4:16])
        qs = b[..., 16:144] if w.format == "q4_k" else b[..., 48:176]
        q = _bits(qs.reshape(*qs.shape[:-1], 4, 32), [0, 4], 4).flatten(-3, -2)  # [..., 8, 32]
        if w.format == "q5_k":
            q = q | (_bits(b[..., 16:48], list(range(8)), 1) << 4)
        v = (d * sc)[..., None] * q.float() - (dmin * mn)[..., None]
    elif w.format == "q6_k":
        ql = _bits(b[..., 0:128].reshape(*b.shape[:-1], 2, 64), [0, 4], 4).reshape(*b.shape[:-1], 8, 32)
        qh = _bits(b[..., 128:192].reshape(*b.shape[:-1], 2, 32), [0, 2, 4, 6], 2).reshape(*b.shape[:-1], 8, 32)
        q = ((ql | (qh << 4)) - 32).float().reshape(*b.shape[:-1], 16, 16)
        sc = b[..., 192:208].contiguous().view(torch.int8).float()
        v = (_f16(b[..., 208:210]) * sc)[..., None] * q
    elif w.format == "q2_k":
        sc = b[..., 0:16].int()
        q = _bits(b[..., 16:80].reshape(*b.shape[:-1], 2, 32), [0, 2, 4, 6], 2).reshape(*b.shape[:-1], 16, 16)
        d, dmin = _f16(b[..., 80:82]), _f16(b[..., 82:84])
        v = (d * (sc & 15).float())[..., None] * q.float() - (dmin * (sc >> 4).float())[..., None]
    else:  # q3_k
        s = b[..., 96:108].int()
        lo = torch.cat([s[..., 0:8] & 15, s[..., 0:8] >> 4], -1)
        hi = _bits(b[..., 104:108], [0, 2, 4, 6], 2).flatten(-2)
        sc = ((lo | (hi << 4)) - 32).float()
        ql = _bits(b[..., 32:96].reshape(*b.shape[:-1], 2, 32), [0, 2, 4, 6], 2).reshape(*b.shape[:-1], 8, 32)
        hm = _bits(b[..., 0:32], list(range(8)), 1)  # [..., 8, 32]
        q = (ql - 4 * (1 - hm)).float().reshape(*b.shape[:-1], 16, 16)
        v = (_f16(b[..., 108:110]) * sc)[..., None] * q
    return v.reshape(*lead, w.cols)


def to_float(w: Weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """Any weight -> float32 (a float32 tensor is returned as is unless `out`, a contiguous float32 tensor of the
    weight's shape to write into, is given)."""
    q, scales, mins = _split(w)
    if (isinstance(w, Packed) or scales is not None) and (lib := _native(q)) is not None and q.dim() == 2:
        m = _mat(w)
        if out is None:
            out = torch.empty(m.rows, m.cols)
        elif out.shape != (m.rows, m.cols) or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"out {list(out.shape)} {out.dtype} is not a contiguous float32 [{m.rows}, {m.cols}]")
        _check(lib.selfseek_dequantize(ctypes.byref(m), 0, m.rows, out.data_ptr()), "dequantize")
        return out
    if isinstance(w, Packed):
        wf = _torch_unpack(w)
    else:
        wf = q.float() if scales is None else _torch_dequantize(q, scales, mins)
    return wf if out is None else out.copy_(wf)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, q4: bool) -> torch.Tensor:
    """Block-quantized [out, in] weight -> float32."""
    _check_q4(qweight, q4)
    return to_float((qweight, scales, mins))


def gather_rows(w: Weight, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of an [out, in] weight as float32 [*ids.shape, in] (an embedding lookup)."""
    q, scales, mins = _split(w)
    if (lib := _native(q, ids)) is not None:
        m = _mat(w)
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        out = torch.empty(flat.numel(), m.cols)
        rc = lib.selfseek_gather_rows(ctypes.byref(m), flat.data_ptr(), flat.numel(), out.data_ptr())
        if rc == -2:
            raise IndexError(f"row index out of range for a weight of {m.rows} rows")
        _check(rc, "gather_rows")
        return out.view(*ids.shape, m.cols)
    if isinstance(w, Packed):  # q8_0x16's rows are not whole byte rows: the weight unpacked, then its rows
        return _torch_unpack(w)[ids] if w.format == "q8_0x16" else _torch_unpack(
            Packed(w.format, w.data[ids], w.scales[ids], w.cols))
    if scales is None:
        return q[ids].float()
    return _torch_dequantize(q[ids], scales[ids], None if mins is None else mins[ids])


def prepare(w: Weight) -> _Mat:
    """The checked kernel view of a weight, for a caller that keeps it (`linear(x, w, prepared)`): decode calls
    each layer once per token, and rebuilding and re-checking the view costs as much as a small layer's product."""
    return _mat(w)


def linear(x: torch.Tensor, w: Weight, prepared: _Mat | None = None) -> torch.Tensor:
    """y = x W^T in float32, for W float (any storage dtype) or block-quantized, without a float copy of W.
    `prepared`: `prepare(w)` of this very weight (its tensors unchanged since), else it is made here."""
    q, scales, mins = _split(w)
    m = _mat(w) if prepared is None else prepared  # checks the weight on every path
    if x.shape[-1] != m.cols:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {m.cols}")
    if (lib := _load()) is None or x.device.type != "cpu" or q.device.type != "cpu":
        if isinstance(w, Packed):
            wf = _torch_unpack(w)
        else:
            wf = q.float() if scales is None else _torch_dequantize(q, scales, mins)
        return torch.nn.functional.linear(x.float(), wf)
    flat = x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous()  # decode's usual case: no copies
    x2 = x if flat else x.reshape(-1, m.cols).float().contiguous()
    rows = x2.shape[0]
    if rows >= GEMM_MIN_ROWS and m.kind == _KINDS[torch.float32]:
        y = torch.mm(x2, q.t())
    elif rows >= GEMM_MIN_ROWS and not _panels_take(m.kind) and not takes_int8(w, rows):
        y = _tiled_mm(lib, m, x2)
    else:
        y = torch.empty(rows, m.rows)
        if rows:
            _check(entry(lib, "selfseek_linear")(ctypes.byref(m), x2.data_ptr(), rows, m.cols, y.data_ptr(), m.rows),
                   "linear")
    return y if flat else y.view(*x.shape[:-1], m.rows)


# The kinds quant.cpp's rows_panel widens into float panels (f32 needs none: torch.mm reads it as it is).
_PANEL_KINDS = frozenset(_KINDS[t] for t in (torch.bfloat16, torch.float16, torch.int8, torch.uint8))


def _panels_take(kind: int) -> bool:
    """Whether compute-bound products of this kind run through the kernels' panels (build.panels_for_gemm), not
    BLAS: the K-quants and fp8 / fp4 have no panels, and their register-unpacked tiles lost to BLAS there (the
    medium V3 Q4_K's 512-token prefill 209 -> 170 tok/s at 1 thread when they took it)."""
    return kind in _PANEL_KINDS and build.panels_for_gemm()


def gemm_by_panels(w: Weight) -> bool:
    """`linear`'s choice for GEMM_MIN_ROWS rows and more of this weight (or stack): the kernels' panels (True) or
    BLAS on dequantized tiles; the MoE layer keeps all of a prefill's experts in the fused kernel when it is True
    for all three of its stacks."""
    return _panels_take(_kind(w))


def _kind(w: Weight) -> int:
    """quant.cpp's kind of a weight or stack (-1 for one it has no kind for)."""
    return FORMATS.get(w.format, (-1,))[0] if isinstance(w, Packed) else _KINDS.get(_split(w)[0].dtype, -1)


def entry(lib: ctypes.CDLL, name: str):
    """The C function `name` (selfseek_linear, selfseek_moe, selfseek_heads) that `linear`, `moe`, `heads` and the
    native decode step call: with INT8_ACTIVATIONS its `_int8` twin, which takes int8 activations for INT8_KINDS up to
    int8_max_rows() rows of x (an expert's tokens, MLA's W^UV per head) and is the float one for the rest."""
    return getattr(lib, f"{name}_int8" if INT8_ACTIVATIONS else name)


def heads(x: torch.Tensor, w: Weight, per_head: int, off: int, n: int, transposed: bool,
          prepared: _Mat | None = None) -> torch.Tensor | None:
    """Per-head products with rows of W = [H * per_head, K] as stored (MLA's absorbed W^UK and W^UV, read from
    kv_b_proj itself: no float copy). Head h uses rows h * per_head + off .. + n. x [R, H, K] -> y [R, H, n] with
    y[r, h] = W_h x[r, h]; transposed: x [R, H, n] -> y [R, H, K] with y[r, h] = W_h^T x[r, h]. float32 out; None
    where the kernels cannot run (not loaded, not on the CPU, or autograd wants x's graph): the caller's torch path."""
    q = _split(w)[0]
    if (lib := _native(x, q)) is None or (torch.is_grad_enabled() and x.requires_grad):
        return None
    m = _mat(w) if prepared is None else prepared
    R, H = x.shape[:2]
    if x.dim() != 3 or x.shape[2] != (n if transposed else m.cols) or H * per_head != m.rows:
        raise ValueError(f"heads: x {list(x.shape)} does not fit {H} heads of {per_head} rows of a {m.rows} x "
                         f"{m.cols} weight")
    x = x.float().contiguous()
    y = torch.empty(R, H, m.cols if transposed else n)
    if R:
        _check(entry(lib, "selfseek_heads")(ctypes.byref(m), x.data_ptr(), R, H, per_head, off, n, int(transposed),
                                            y.data_ptr()), "heads")
    return y


def _tiled_mm(lib: ctypes.CDLL, m: _Mat, x: torch.Tensor) -> torch.Tensor:
    """Compute-bound products: y^T one tile of weight rows at a time, each dequantized into one reused buffer."""
    step = max(16, TILE_VALUES // m.cols // 16 * 16)
    buf = torch.empty(min(step, m.rows), m.cols)
    yt = torch.empty(m.rows, x.shape[0])
    xt = x.t()
    for n0 in range(0, m.rows, step):
        n1 = min(m.rows, n0 + step)
        tile = buf[: n1 - n0]
        _check(lib.selfseek_dequantize(ctypes.byref(m), n0, n1, tile.data_ptr()), "dequantize")
        torch.mm(tile, xt, out=yt[n0:n1])
    return yt.t().contiguous()


def _check_q4(qweight: torch.Tensor, q4: bool) -> None:
    if q4 != (qweight.dtype == torch.uint8):
        raise TypeError(f"q4={q4} but qweight is {qweight.dtype} (q8 weights are int8, q4 uint8)")


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 q4: bool) -> torch.Tensor:
    """y = x W^T (float32) for a block-quantized W."""
    _check_q4(qweight, q4)
    return linear(x, (qweight, scales, mins))


def moe_native(x: torch.Tensor, *stacks: Weight) -> bool:
    """Whether `moe` runs the fused kernel for these activations and expert stacks (else the caller's torch path)."""
    tensors = [x, *(_split(s)[0] for s in stacks)]
    return all(t.dtype in _KINDS for t in tensors[1:]) and _native(*tensors) is not None  # Packed data is uint8


def prepare_stacks(gate: Weight, up: Weight, down: Weight) -> tuple[_Mat, _Mat, _Mat, int]:
    """The checked kernel views of the three expert stacks and their number of experts, for a caller that keeps them
    (`moe(..., prepared=)`)."""
    n_experts = _split(gate)[0].shape[0]
    if len({n_experts, _split(up)[0].shape[0], _split(down)[0].shape[0]}) != 1:
        raise ValueError("gate, up and down stacks hold different numbers of experts")
    return _mat(gate, True), _mat(up, True), _mat(down, True), n_experts


def moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate: Weight, up: Weight,
        down: Weight, limit: float = 0.0, prepared: tuple[_Mat, _Mat, _Mat, int] | None = None) -> torch.Tensor:
    """Fused routed experts on the CPU: y[t] = sum_j weights[t, j] FFN_{ids[t, j]}(x[t]), FFN = down(silu(gate x) *
    up x); gate/up stacks [E, inter, hidden], down [E, hidden, inter]; float32 result. See quant.cpp.
    limit > 0 (DeepSeek-V4's swiglu_limit): gate x clamped at most limit, up x to [-limit, limit] before SwiGLU.
    `prepared`: prepare_stacks() of these very stacks, else made here."""
    lib = _native(x)
    if lib is None:
        raise RuntimeError("kernels.moe needs the native kernels and CPU tensors (check moe_native first)")
    g, u, d, n_experts = prepare_stacks(gate, up, down) if prepared is None else prepared
    x2 = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()  # no no-op casts: a decode
    w = weights if weights.dtype == torch.float32 and weights.is_contiguous() else weights.float().contiguous()
    i = ids if ids.dtype == torch.int64 and ids.is_contiguous() else ids.to(torch.int64).contiguous()
    y = torch.empty_like(x2)
    rc = entry(lib, "selfseek_moe")(x2.data_ptr(), x2.shape[0], x2.shape[1], i.data_ptr(), w.data_ptr(), i.shape[1],
                                    n_experts, ctypes.byref(g), ctypes.byref(u), ctypes.byref(d), y.data_ptr(),
                                    float(limit))
    if rc == -2:
        raise IndexError(f"expert id out of range (n_experts={n_experts})")
    _check(rc, "moe")
    return y
