"""Fused small ops of the decode step: residual add + RMSNorm, rotary in place, SwiGLU's silu(gate) * up, and
DeepSeek-V4's hyper-connection weights and stream mixing, and its sink attention over one shared K = V head
(kernels/fused_ops.cpp); and the structures of its decode step in few calls (DecodeStep, DecodeLayer).

Each wrapper runs the C++ kernel for contiguous-row float32 CPU tensors and the same math in plain torch
otherwise (SELFSEEK_NO_KERNELS=1, no compiler, another device or dtype), so callers need no second path.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from selfseek.kernels import build

_c_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class HeadProduct(ctypes.Structure):
    """fused_ops.cpp's HeadProduct: mla.py's HeadProduct as the kernel reads it (its view's address)."""

    _fields_ = [("view", _ptr), ("per_head", _c_i64), ("off", _c_i64), ("n", _c_i64), ("transposed", ctypes.c_int32)]


class DecodeLayer(ctypes.Structure):
    """fused_ops.cpp's DecodeLayer: one decoder layer's kernel views (quant.cpp Mat addresses), norms, pool and shapes:
    GQA or MLA attention, then a SwiGLU MLP or routed experts (plus shared experts when gate_up is set)."""

    _fields_ = [("in_norm", _ptr), ("post_norm", _ptr), ("in_eps", ctypes.c_float), ("post_eps", ctypes.c_float),
                ("pool", _ptr), ("mla", ctypes.c_int32), ("moe", ctypes.c_int32), ("scale", ctypes.c_float),
                ("interleaved", ctypes.c_int32), ("qkv", _ptr), ("o", _ptr), ("heads", _c_i64), ("n_kv", _c_i64),
                ("head_dim", _c_i64), ("down", _ptr), ("q_b", _ptr), ("q_norm", _ptr), ("kv_norm", _ptr),
                ("q_eps", ctypes.c_float), ("kv_eps", ctypes.c_float), ("uk", HeadProduct), ("uv", HeadProduct),
                ("nope", _c_i64), ("rope", _c_i64), ("v_dim", _c_i64), ("latent", _c_i64), ("q_lora", _c_i64),
                ("gate_up", _ptr), ("mlp_down", _ptr), ("inter", _c_i64), ("e_gate", _ptr), ("e_up", _ptr),
                ("e_down", _ptr), ("n_experts", _c_i64), ("top_k", _c_i64), ("router", _ptr), ("router_bias", _ptr),
                ("scoring", ctypes.c_int32), ("method", ctypes.c_int32), ("n_group", _c_i64), ("topk_group", _c_i64),
                ("norm", ctypes.c_int32), ("route_scale", ctypes.c_float)]


class DecodeStep(ctypes.Structure):
    """fused_ops.cpp's DecodeStep: the kernels to call (function addresses), one decode batch and the attention
    kernel's strides over the layers' pools."""

    _fields_ = [("linear", _ptr), ("attention", _ptr), ("heads", _ptr), ("moe", _ptr), ("gate", _ptr),
                ("timings", _ptr), ("rows", _c_i64),
                ("hidden", _c_i64), ("cos", _ptr), ("sin", _ptr), ("slots", _ptr), ("block_tables", _ptr),
                ("cu_q", _ptr), ("context_lens", _ptr), ("table_stride", _c_i64), ("block_size", ctypes.c_int32),
                ("num_seqs", ctypes.c_int32), ("n_threads", ctypes.c_int32), ("k_slot_stride", _c_i64),
                ("k_head_stride", _c_i64), ("v_offset", _c_i64), ("v_slot_stride", _c_i64),
                ("v_head_stride", _c_i64)]


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the C signatures of a loaded fused_ops library (any level)."""
    lib.selfseek_silu_mul.argtypes = [_ptr, _c_i64, _ptr, _c_i64, _c_i64]
    lib.selfseek_silu_mul.restype = None
    step, layer = ctypes.POINTER(DecodeStep), ctypes.POINTER(DecodeLayer)
    lib.selfseek_decode_layers.argtypes = [step, layer, _c_i64, _ptr]
    lib.selfseek_decode_layers.restype = ctypes.c_int32
    lib.selfseek_argmax_rows.argtypes = [_ptr, _c_i64, _c_i64, _c_i64, _ptr]
    lib.selfseek_argmax_rows.restype = None
    lib.selfseek_add_rms_norm.argtypes = [_ptr, _c_i64, _ptr, _c_i64, _ptr, _ptr, _c_i64, _c_i64, ctypes.c_float]
    lib.selfseek_add_rms_norm.restype = None
    lib.selfseek_rope.argtypes = [_ptr, _c_i64, _c_i64, _ptr, _c_i64, _c_i64, _c_i64, _c_i64, _c_i64, _ptr, _ptr,
                                  ctypes.c_int32]
    lib.selfseek_rope.restype = None
    lib.selfseek_hc_pre.argtypes = [_ptr, _ptr, _ptr, _ptr, _c_i64, _c_i64, _c_i64, ctypes.c_float, ctypes.c_float,
                                    _c_i64, _ptr, _ptr, _ptr]
    lib.selfseek_hc_pre.restype = None
    lib.selfseek_hc_post.argtypes = [_ptr, _ptr, _ptr, _ptr, _c_i64, _c_i64, _c_i64, _c_i64, _ptr]
    lib.selfseek_hc_post.restype = None
    lib.selfseek_sink_attention.argtypes = [_ptr, _c_i64, _c_i64, _c_i64, _ptr, _c_i64, _ptr, _ptr, _c_i64, _ptr, _ptr,
                                            ctypes.c_float, _ptr]
    lib.selfseek_sink_attention.restype = None
    return lib


def _load() -> ctypes.CDLL | None:
    return build.load("fused_ops", bind)


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


def argmax_rows(x: torch.Tensor) -> list[int]:
    """x.max(dim=-1).indices.tolist() of a [rows, n] matrix (greedy sampling): the first index of each row's largest
    value, of its first NaN where it has one, as torch's; the kernel for float32 CPU rows, torch otherwise."""
    lib = _load()
    if lib is not None and _rows_ok(x) and x.shape[1] > 0:
        out = torch.empty(x.shape[0], dtype=torch.int64)
        lib.selfseek_argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr())
        return out.tolist()
    return x.max(dim=-1).indices.tolist()


def silu_mul(gate_up: torch.Tensor, inter: int) -> torch.Tensor:
    """SwiGLU's silu(gate) * up of gate_up [..., 2 * inter] = [gate; up] -> [..., inter]. The kernel's exp is a
    polynomial (its error against fp64 measured as torch's: 1.6e-7 relative at most), the same bits on every level,
    and what the native decode step computes too."""
    lib = _load()
    if (lib is not None and gate_up.dtype == torch.float32 and gate_up.device.type == "cpu"
            and gate_up.shape[-1] == 2 * inter and not (torch.is_grad_enabled() and gate_up.requires_grad)):
        flat = gate_up.reshape(-1, 2 * inter)
        if flat.stride(1) == 1:
            out = torch.empty(*gate_up.shape[:-1], inter)
            lib.selfseek_silu_mul(flat.data_ptr(), flat.stride(0), out.data_ptr(), flat.shape[0], inter)
            return out
    gate, up = gate_up.split([inter, gate_up.shape[-1] - inter], dim=-1)
    return F.silu(gate) * up


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


HC_MAX = 16  # hc_mult the hyper-connection kernels take (fused_ops.cpp's HC_MAX)


def _hc_ok(streams: torch.Tensor, *params: torch.Tensor) -> bool:
    """Float32 CPU tensors outside autograd, streams [T, n <= HC_MAX, m] and params contiguous."""
    ts = (streams, *params)
    return (streams.dim() == 3 and streams.shape[1] <= HC_MAX
            and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in ts)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)))


def hc_runs(streams: torch.Tensor) -> bool:
    """Whether the hyper-connection kernels can take these streams (library loaded, float32 CPU, n <= HC_MAX): a
    caller checks it before preparing hc_pre's inputs, which the torch formula would otherwise compute again."""
    return _load() is not None and _hc_ok(streams)


def hc_pre(mix: torch.Tensor, streams: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_eps: float,
           hc_eps: float, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """DeepSeek-V4 mHC weights (deepseek_v4.HyperConnection's formula) from mix = streams.flatten(1) @ fn^T [T, (2+n)n]
    (before the unweighted RMSNorm, whose factor the kernel applies), base [(2+n)n], scale [3] -> (post [T, n], comb
    [T, n, n] Sinkhorn-projected, block input sum_j pre_j X_j [T, m]), or None where the kernel cannot take these
    tensors (the caller then runs the torch formula)."""
    lib = _load()
    if lib is None or not _hc_ok(streams, mix, base, scale):
        return None
    rows, n, m = streams.shape
    if mix.shape != (rows, (2 + n) * n) or base.shape != ((2 + n) * n,) or scale.shape != (3,):
        return None
    post, comb, collapsed = torch.empty(rows, n), torch.empty(rows, n, n), torch.empty(rows, m)
    lib.selfseek_hc_pre(mix.data_ptr(), streams.data_ptr(), base.data_ptr(), scale.data_ptr(), rows, n, m, norm_eps,
                        hc_eps, iters, post.data_ptr(), comb.data_ptr(), collapsed.data_ptr())
    return post, comb, collapsed


def hc_post(post: torch.Tensor, comb: torch.Tensor, streams: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """The streams after a block: X'_k = post_k y + sum_j comb[j, k] X_j ([T, n, m]; y [T, m] with contiguous rows),
    or None where the kernel cannot take these tensors."""
    lib = _load()
    if (lib is None or not _hc_ok(streams, post, comb) or not _rows_ok(y)
            or (y.requires_grad and torch.is_grad_enabled())):
        return None
    rows, n, m = streams.shape
    if post.shape != (rows, n) or comb.shape != (rows, n, n) or y.shape != (rows, m):
        return None
    out = torch.empty(rows, n, m)
    lib.selfseek_hc_post(post.data_ptr(), comb.data_ptr(), streams.data_ptr(), y.data_ptr(), y.stride(0), rows, n, m,
                         out.data_ptr())
    return out


def sink_attention(q: torch.Tensor, kv: torch.Tensor, visible: torch.Tensor | None, sinks: torch.Tensor, scale: float,
                   per_row: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
    """deepseek_v4.sink_attention's formula (q [s, h, d]; kv [t, d] where visible [s, t] (None: everywhere); per_row:
    each row's own keys [s, k, d] where valid [s, k]; per-head sinks [h] in each softmax's denominator) -> [s, h, d],
    or None where the kernel cannot take these tensors (the caller then runs the torch formula)."""
    lib = _load()
    own, valid = per_row if per_row is not None else (None, None)
    ts = [t for t in (q, kv, sinks, own) if t is not None]
    if (lib is None or q.dim() != 3 or kv.dim() != 2
            or not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in ts)
            or (torch.is_grad_enabled() and any(t.requires_grad for t in ts))):
        return None
    s, h, d = q.shape
    k = 0 if own is None else own.shape[1]
    masks = [(visible, (s, kv.shape[0])), (valid, (s, k))]
    if (kv.shape[1] != d or sinks.shape != (h,) or (own is not None and (own.shape[0], own.shape[2]) != (s, d))
            or any(m is not None and (m.dtype != torch.bool or m.shape != shape or not m.is_contiguous())
                   for m, shape in masks)):
        return None
    out = torch.empty(s, h, d)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    lib.selfseek_sink_attention(q.data_ptr(), s, h, d, kv.data_ptr(), kv.shape[0], ptr(visible), ptr(own), k,
                                ptr(valid), sinks.data_ptr(), scale, out.data_ptr())
    return out
