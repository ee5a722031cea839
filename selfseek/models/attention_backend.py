"""The attention backend every attention module calls: dense causal attention over new tokens, and paged
attention of query rows against their sequence's cache, read through the block tables.

Caches are described by strided views, so one kernel serves every layout (see kernels/paged_attention.cpp):
k_cache [slots, kv_heads, dk] and v_cache [slots, kv_heads, dv], each a view of a layer's pool with unit
stride in the last dim. MLA passes pool[:, None, :] as K (latent then roped key) and pool[:, None, :c] as V;
GQA passes pool[:, 0] and pool[:, 1].

On the CPU the paged path runs the C++ kernel (online softmax over tiles of keys, no gathered copy of the
context); on other devices, or with SELFSEEK_NO_KERNELS=1, a torch fallback with the same interface gathers
each sequence's context. Dense attention is torch's scaled_dot_product_attention everywhere.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from selfseek.kernels.build import library
from selfseek.models.batch import PagedRows

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """q [s, h, dk], k [t, kv, dk], v [t, kv, dv] -> [s, h, dv].

    mask None: causal with s == t; else [s, t], additive or boolean (True: visible).
    Query head i uses KV head i // (h // kv), as in every GQA checkpoint.
    """
    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(
        qt, kt, vt, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )
    return out[0].transpose(0, 1)


def _kernel(device: torch.device) -> ctypes.CDLL | None:
    if device.type != "cpu":
        return None
    lib = library("paged_attention")
    if lib is not None and not getattr(lib, "_selfseek_typed", False):
        f = lib.selfseek_paged_attention
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
        f.argtypes = [p, p, i64, p, i64, i64, p, i64, i64, i32, p, i64, i32, p, p, i32, i32, i32, i32, i32,
                      ctypes.c_float, i32]
        f.restype = i32
        lib._selfseek_typed = True
    return lib


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: PagedRows, scale: float
) -> torch.Tensor:
    """q [R, kv, g, dk] (rows of the sequences in `rows`, in order) -> [R, kv, g, dv] in q's dtype.

    Row j of a sequence with n rows and context length L sees keys 0 .. L - n + j (causal).
    """
    R, n_kv, g, dk = q.shape
    dv = v_cache.shape[-1]
    if k_cache.shape[1:] != (n_kv, dk) or v_cache.shape[1] != n_kv:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} do not fit q "
                         f"{tuple(q.shape)}")
    if R != rows.num_rows:
        raise ValueError(f"q has {R} rows but the paged batch has {rows.num_rows}")
    tables = rows.block_tables
    if tables.shape[1] * rows.block_size < rows.max_context:
        raise ValueError(f"block_tables {tuple(tables.shape)} of {rows.block_size}-slot blocks cannot hold "
                         f"max_context {rows.max_context}")
    lib = _kernel(q.device)
    if lib is None or k_cache.dtype not in _DTYPE_CODE or v_cache.dtype != k_cache.dtype:
        return _paged_attention_torch(q, k_cache, v_cache, rows, scale)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need unit stride in their last dim")
    cu_q, ctx = rows.cu_q, rows.context_lens
    for name, t in (("block_tables", tables), ("cu_q", cu_q), ("context_lens", ctx)):
        if t.dtype != torch.int32 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{name} must be a contiguous int32 CPU tensor, got {t.dtype} on {t.device}")
    q32 = q.float().contiguous()
    out = torch.empty(R, n_kv, g, dv, dtype=torch.float32)
    rc = lib.selfseek_paged_attention(
        q32.data_ptr(), out.data_ptr(), R,
        k_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1),
        v_cache.data_ptr(), v_cache.stride(0), v_cache.stride(1), _DTYPE_CODE[k_cache.dtype],
        tables.data_ptr(), tables.stride(0), rows.block_size, cu_q.data_ptr(), ctx.data_ptr(), len(ctx),
        n_kv, g, dk, dv, scale, torch.get_num_threads(),
    )
    if rc != 0:
        raise ValueError(f"paged attention rejected its batch (code {rc}): cu_q {cu_q.tolist()}, "
                         f"context_lens {ctx.tolist()}")
    return out.to(q.dtype)


def _paged_attention_torch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: PagedRows, scale: float
) -> torch.Tensor:
    """The same result by gathering each sequence's context (padded to the longest) and masking."""
    device = q.device
    slots = rows.context_slots().to(device)  # [S, t]
    t = slots.shape[1]
    k, v = k_cache[slots].float(), v_cache[slots].float()  # [S, t, kv, d]
    n = rows.cu_q.diff().long().to(device)
    S, R = n.shape[0], q.shape[0]
    seq = torch.repeat_interleave(torch.arange(S, device=device), n)
    local = torch.arange(R, device=device) - rows.cu_q[:-1].long().to(device)[seq]
    row_ctx = rows.context_lens.long().to(device)[seq] - (n[seq] - 1 - local)
    s_max = int(n.max())
    qp = q.new_zeros(S, s_max, *q.shape[1:], dtype=torch.float32)
    qp[seq, local] = q.float()
    lens = torch.zeros(S, s_max, dtype=torch.long, device=device)
    lens[seq, local] = row_ctx
    scores = torch.einsum("bskgd,btkd->bskgt", qp, k) * scale
    hidden = torch.arange(t, device=device)[None, None, :] >= lens[:, :, None]  # [S, s, t]
    scores = scores.masked_fill(hidden[:, :, None, None, :], float("-inf"))
    p = scores.softmax(dim=-1).nan_to_num(0.0)  # padding rows see nothing
    out = torch.einsum("bskgt,btkd->bskgd", p, v)
    return out[seq, local].to(q.dtype)
