"""Fused small ops of the decode step: residual add + RMSNorm, and rotary in place (kernels/fused_ops.cpp).

Each wrapper runs the C++ kernel for contiguous-row float32 CPU tensors and the same math in plain torch
otherwise (SELFSEEK_NO_KERNELS=1, no compiler, another device or dtype), so callers need no second path.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

_c_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_lib: ctypes.CDLL | None = None
_loaded = False


def _load() -> ctypes.CDLL | None:
    global _lib, _loaded
    if not _loaded:
        _loaded = True
        from selfseek.kernels import build

        lib = build.library("fused_ops")
        _lib = bind(lib) if lib is not None else None
    return _lib


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the C signatures of a loaded fused_ops library (any level)."""
    lib.selfseek_add_rms_norm.argtypes = [_ptr, _c_i64, _ptr, _c_i64, _ptr, _ptr, _c_i64, _c_i64, ctypes.c_float]
    lib.selfseek_add_rms_norm.restype = None
    lib.selfseek_rope.argtypes = [_ptr, _c_i64, _c_i64, _ptr, _c_i64, _c_i64, _c_i64, _c_i64, _c_i64, _ptr, _ptr,
                                  ctypes.c_int32]
    lib.selfseek_rope.restype = None
    return lib


def _rows_ok(t: torch.Tensor) -> bool:
    """A float32 CPU matrix whose rows are contiguous (any row stride)."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 2 and t.stride(1) == 1


def add_rms_norm(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x (in place; x None: no add), then -> RMSNorm(residual) * weight as a new [T, m] tensor.

    The decoder's `h = h + sublayer(...)` followed by the next norm, in one pass over the row."""
    lib = _load()
    tracked = torch.is_grad_enabled() and (residual.requires_grad or (x is not None and x.requires_grad)
                                           or weight.requires_grad)  # autograd cannot see the kernel's writes
    if (lib is not None and not tracked and _rows_ok(residual)
            and (x is None or (_rows_ok(x) and x.shape == residual.shape))
            and weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.is_contiguous()
            and weight.shape == residual.shape[1:]):
        rows, dim = residual.shape
        out = torch.empty(rows, dim)
        lib.selfseek_add_rms_norm(residual.data_ptr(), residual.stride(0), None if x is None else x.data_ptr(),
                                  0 if x is None else x.stride(0), weight.data_ptr(), out.data_ptr(), rows, dim, eps)
        return out
    if x is not None:
        residual.add_(x)
    if residual.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(residual, (residual.shape[-1],), weight, eps)
    return weight * F.rms_norm(residual.float(), (residual.shape[-1],), eps=eps).to(residual.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
         out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Rotary embedding (layers.Rotary's math, bit for bit) of x [T, d] or [T, heads, d] (rows and heads may be
    strided, each head's d values contiguous) with cos/sin [T, d/2] float32, into `out` (x itself: in place; None:
    a new contiguous tensor). -> the result, or None where the kernel cannot take these tensors (the caller then
    runs the torch formula)."""
    lib = _load()
    if lib is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() not in (2, 3) or (
            x.requires_grad and torch.is_grad_enabled()):  # autograd cannot see a write through a pointer
        return None
    rows, d = x.shape[0], x.shape[-1]
    if x.stride(-1) != 1 or d % 2 or cos.dtype != torch.float32 or cos.shape != (rows, d // 2) or (
            sin.shape != cos.shape or sin.dtype != cos.dtype or not (cos.is_contiguous() and sin.is_contiguous())):
        return None
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32)
    elif out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1:
        return None
    heads, xs_h, ys_h = (x.shape[1], x.stride(1), out.stride(1)) if x.dim() == 3 else (1, d, d)
    lib.selfseek_rope(x.data_ptr(), x.stride(0), xs_h, out.data_ptr(), out.stride(0), ys_h, rows, heads, d,
                      cos.data_ptr(), sin.data_ptr(), int(interleaved))
    return out
