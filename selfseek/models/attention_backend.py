"""The attention backend every attention module calls: dense causal attention over new tokens, and paged
attention of query rows against their sequence's cache, read through the block tables.

Caches are described by strided views, so one kernel serves every layout (see kernels/paged_attention.cpp):
k_cache [slots, kv_heads, dk] and v_cache [slots, kv_heads, dv], each a view of a layer's pool with unit
stride in the last dim. MLA passes pool[:, None, :] as K (latent then roped key) and pool[:, None, :c] as V;
GQA passes pool[:, 0] and pool[:, 1].

FP8 caches (`--kv-cache-dtype fp8`): a layer's pool is uint8 rows, each a token's values as float8_e4m3fn
followed by one fp32 scale per FP8_TILE values (per-token tiles, as DeepSeek's FP8 KV cache in FlashMLA keeps
them): MLA one row per token (latent and roped key), GQA one row per token, K/V and KV head ([slots, 2, kv,
row bytes]). `quantize_fp8` writes rows, `dequantize_fp8` reads them, and paged attention takes the fp8 bytes
as K/V with their scales views and dequantizes each tile it reads (kernel and torch alike).

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
_FP8_CODE = 3

FP8 = torch.float8_e4m3fn
FP8_TILE = 64  # values per scale in an fp8 cache row
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def _fp8_layout(width: int) -> tuple[int, int]:
    """(byte offset of the scales, number of scales) of an fp8 row holding `width` values (scales 4-aligned)."""
    return -(-width // 4) * 4, -(-width // FP8_TILE)


def fp8_row_bytes(width: int) -> int:
    """Bytes of one token's fp8 cache row of `width` values: the values, then their fp32 tile scales."""
    offset, n = _fp8_layout(width)
    return offset + 4 * n


def quantize_fp8(x: torch.Tensor) -> torch.Tensor:
    """x [n, width] -> uint8 rows [n, fp8_row_bytes(width)]: each tile of FP8_TILE values scaled so its largest
    magnitude is FP8_MAX (round to nearest), the fp32 scale stored after the values."""
    n, width = x.shape
    offset, tiles = _fp8_layout(width)
    xf = torch.nn.functional.pad(x.float(), (0, tiles * FP8_TILE - width)).view(n, tiles, FP8_TILE)
    amax = xf.abs().amax(dim=-1)
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (xf / scales[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(n, -1)[:, :width]
    rows = torch.zeros(n, offset + 4 * tiles, dtype=torch.uint8, device=x.device)
    rows[:, :width] = q.view(torch.uint8)
    rows[:, offset:] = scales.contiguous().view(torch.uint8).view(n, 4 * tiles)
    return rows


def fp8_scales(pool: torch.Tensor, width: int) -> torch.Tensor:
    """The fp32 scales of an fp8 pool [..., row bytes] as a strided view [..., tiles]."""
    offset, tiles = _fp8_layout(width)
    return pool[..., offset : offset + 4 * tiles].view(torch.float32)


def dequantize_fp8(rows: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 rows [..., fp8_row_bytes(width)] -> fp32 values [..., width]."""
    offset, tiles = _fp8_layout(width)
    values = rows[..., :width].contiguous().view(FP8).float()
    scales = rows[..., offset : offset + 4 * tiles].contiguous().view(torch.float32)
    return values * scales.repeat_interleave(FP8_TILE, dim=-1)[..., :width]


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
    dv = v.shape[-1]
    if dv < q.shape[-1] and q.device.type == "cpu":
        # torch's fused CPU kernel takes only value widths equal to the key's; MLA's (128 against 192) fell back to the
        # unfused math (the whole score matrix, no causal skipping): zero columns cost less (512 tokens, 16 heads:
        # 57 against 101 ms)
        vt = F.pad(vt, (0, q.shape[-1] - dv))
    out = F.scaled_dot_product_attention(
        qt, kt, vt, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )
    return out[0, ..., :dv].transpose(0, 1)


def _kernel(device: torch.device) -> ctypes.CDLL | None:
    if device.type != "cpu":
        return None
    lib = library("paged_attention")
    if lib is not None and not getattr(lib, "_selfseek_typed", False):
        f = lib.selfseek_paged_attention
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
        f.argtypes = [p, p, i64, p, i64, i64, p, i64, i64, i32, p, i64, i32, p, p, i32, i32, i32, i32, i32,
                      ctypes.c_float, i32, p, p, i64, i64, i32]
        f.restype = i32
        lib.selfseek_fp8_dequantize.argtypes = [p, p, i32, i32, p]
        lib.selfseek_fp8_dequantize.restype = None
        lib._selfseek_typed = True
    return lib


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: PagedRows, scale: float,
    fp8_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q [R, kv, g, dk] (rows of the sequences in `rows`, in order) -> [R, kv, g, dv] in q's dtype.

    Row j of a sequence with n rows and context length L sees keys 0 .. L - n + j (causal).
    fp8_scales (an fp8 cache): (K scales, V scales), each [slots, kv, tiles] with the same strides; k_cache /
    v_cache are uint8 views of the fp8 values, value j of a slot's head h scaled by scales[slot, h, j // FP8_TILE]
    (MLA passes one view twice: K and V read the same row).
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
    if fp8_scales is not None:
        ks, vs = fp8_scales
        if k_cache.dtype != torch.uint8 or v_cache.dtype != torch.uint8:
            raise ValueError(f"an fp8 cache needs uint8 K/V views, got {k_cache.dtype} / {v_cache.dtype}")
        for name, sc, d in (("K", ks, dk), ("V", vs, dv)):
            if (sc.dtype != torch.float32 or sc.dim() != 3 or sc.shape[1] != n_kv or sc.shape[2] * FP8_TILE < d
                    or sc.stride() != ks.stride() or sc.stride(-1) != 1):
                raise ValueError(f"fp8_scales: the {name} scales {tuple(sc.shape)} {sc.dtype} strides {sc.stride()} "
                                 f"are not fp32 [slots, {n_kv}, >= {-(-d // FP8_TILE)}] with the K scales' strides")
    lib = _kernel(q.device)
    known = fp8_scales is not None or k_cache.dtype in _DTYPE_CODE
    if lib is None or not known or v_cache.dtype != k_cache.dtype:
        return _paged_attention_torch(q, k_cache, v_cache, rows, scale, fp8_scales)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need unit stride in their last dim")
    cu_q, ctx = rows.cu_q, rows.context_lens
    if "kernel_checked" not in rows._splits:  # once per batch, not once per layer
        for name, t in (("block_tables", tables), ("cu_q", cu_q), ("context_lens", ctx)):
            if t.dtype != torch.int32 or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError(f"{name} must be a contiguous int32 CPU tensor, got {t.dtype} on {t.device}")
        rows._splits["kernel_checked"] = True
    q32 = q if q.dtype == torch.float32 and q.is_contiguous() else q.float().contiguous()
    out = torch.empty(R, n_kv, g, dv, dtype=torch.float32)
    run_kernel(lib, kernel_args(q32, out, k_cache, v_cache, rows, scale, fp8_scales), rows)
    return out if q.dtype == torch.float32 else out.to(q.dtype)


# Positions of the K and V cache addresses in kernel_args' list (a caller reusing one list across layers whose
# pools share shapes and strides replaces just these).
K_ARG, V_ARG = 3, 6


def kernel_args(q32: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                rows: PagedRows, scale: float, fp8_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> list:
    """The C kernel's arguments for contiguous float32 q [R, kv, g, dk] and out [R, kv, g, dv] (paged_attention has
    checked the rest)."""
    R, n_kv, g, dk = q32.shape
    tables, ctx = rows.block_tables, rows.context_lens
    return [
        q32.data_ptr(), out.data_ptr(), R,
        k_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1),
        v_cache.data_ptr(), v_cache.stride(0), v_cache.stride(1),
        _FP8_CODE if fp8_scales is not None else _DTYPE_CODE[k_cache.dtype],
        tables.data_ptr(), tables.stride(0), rows.block_size, rows.cu_q.data_ptr(), ctx.data_ptr(), len(ctx),
        n_kv, g, dk, out.shape[-1], scale, torch.get_num_threads(),
        *((None, None, 0, 0, 0) if fp8_scales is None else
          (fp8_scales[0].data_ptr(), fp8_scales[1].data_ptr(), *fp8_scales[0].stride()[:2], FP8_TILE)),
    ]


def run_kernel(lib: ctypes.CDLL, args: list, rows: PagedRows) -> None:
    """Call the C kernel with kernel_args' list; a rejected batch is an error naming it."""
    rc = lib.selfseek_paged_attention(*args)
    if rc != 0:
        raise ValueError(f"paged attention rejected its batch (code {rc}): cu_q {rows.cu_q.tolist()}, "
                         f"context_lens {rows.context_lens.tolist()}")


def _paged_attention_torch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: PagedRows, scale: float,
    fp8_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The same result by gathering each sequence's context (padded to the longest) and masking."""
    device = q.device
    slots = rows.context_slots().to(device)  # [S, t]
    t = slots.shape[1]
    k, v = k_cache[slots], v_cache[slots]  # [S, t, kv, d]
    if fp8_scales is None:
        k, v = k.float(), v.float()
    else:  # the gathered tiles only
        ks, vs = (sc[slots].repeat_interleave(FP8_TILE, dim=-1) for sc in fp8_scales)  # [S, t, kv, tiles x 64]
        k = k.view(FP8).float() * ks[..., : k.shape[-1]]
        v = v.view(FP8).float() * vs[..., : v.shape[-1]]
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
