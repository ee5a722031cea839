"""kernels/fused_ops: the fused residual-add + RMSNorm and in-place rotary against plain-torch references, on
every instruction-set level this CPU runs, greedy sampling's row argmax against torch's, and the fused decoder stack
against the layer-by-layer one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from selfseek.config import RopeConfig
from selfseek.kernels import build, fused_ops
from selfseek.models.layers import Rotary

needs_kernels = pytest.mark.skipif(build.library("fused_ops") is None, reason="fused_ops kernels unavailable")


def _reference_add_norm(x, residual, w, eps):
    """HF's LlamaRMSNorm after `h = h + x`, in float64 (the exact value both paths approximate)."""
    h = residual.double() + (0 if x is None else x.double())
    return h, w.double() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))


@needs_kernels
@pytest.mark.parametrize("rows,dim", [(1, 576), (3, 100), (20, 1024), (2, 7)])
@pytest.mark.parametrize("with_x", [True, False])
def test_add_rms_norm_matches_reference(rows, dim, with_x):
    g = torch.Generator().manual_seed(rows * dim)
    residual = torch.randn(rows, dim, generator=g) * 3
    x = torch.randn(rows, dim, generator=g) if with_x else None
    w = torch.randn(dim, generator=g)
    want_h, want = _reference_add_norm(x, residual, w, 1e-5)
    eager_h = residual + (0 if x is None else x)
    eager = F.rms_norm(eager_h, (dim,), w, 1e-5)  # what RMSNorm.forward computes today
    res = residual.clone()
    out = fused_ops.add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(res, eager_h)  # the residual sum itself is exact (one rounding per element, as torch's)
    torch.testing.assert_close(out.double(), want, rtol=2e-6, atol=2e-6)
    # no further from the exact value than torch's own fp32 result (both differ only in summation order)
    assert (out.double() - want).abs().max() <= 2 * (eager.double() - want).abs().max() + 1e-6


@needs_kernels
def test_add_rms_norm_strided_rows_and_fallback_agree(kernel_env):
    g = torch.Generator().manual_seed(1)
    big = torch.randn(4, 64, generator=g)
    residual, x = big[:, :32], big[:, 32:]  # rows with stride 64
    w = torch.rand(32, generator=g)
    want = F.rms_norm(residual + x, (32,), w, 1e-6)
    kernel_res = residual.clone()
    got = fused_ops.add_rms_norm(x, residual, w, 1e-6)  # writes the strided view in place
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(residual, kernel_res + x, rtol=0, atol=0)
    kernel_env(SELFSEEK_NO_KERNELS="1")
    r2 = kernel_res.clone()
    torch.testing.assert_close(fused_ops.add_rms_norm(x, r2, w, 1e-6), want, rtol=0, atol=0)  # torch fallback
    assert torch.equal(r2, residual)


def _rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The plain rotary formula in float64 (not the code under test's own tricks); x [T, h, d], cos [T, d/2]."""
    xd, c, s = x.double(), cos.double()[:, None], sin.double()[:, None]
    if interleaved:
        x1, x2 = xd[..., 0::2], xd[..., 1::2]
        return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    x1, x2 = xd.chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


@needs_kernels
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rows,heads,d", [(1, 12, 64), (5, 3, 128), (17, 2, 6)])
def test_rope_is_bitwise_the_torch_rotary(rows, heads, d, interleaved, kernel_env):
    rot = Rotary(RopeConfig(theta=10000.0), d, interleaved=interleaved)
    g = torch.Generator().manual_seed(d)
    cos, sin = rot.cos_sin(torch.randint(0, 4000, (rows,), generator=g))
    # strided rows and heads, as q_rope inside MLA's q or q|k inside the fused qkv output
    whole = torch.randn(rows, heads, d + 5, generator=g)
    x, tail = whole[..., :d], whole[..., d:].clone()
    with torch.no_grad():
        kernel_env(SELFSEEK_NO_KERNELS="1")
        want = rot(x, cos, sin)  # Rotary.forward's torch formula: what the kernel must equal
        kernel_env(SELFSEEK_NO_KERNELS=None)
        got = fused_ops.rope(x, cos, sin, interleaved)
        assert got is not None and got.is_contiguous()
        assert torch.equal(got, want)
        assert torch.equal(rot(x, cos, sin), want)  # Rotary.forward through the kernel
        assert torch.equal(fused_ops.rope(x[:, 0], cos, sin, interleaved), want[:, 0])  # [T, d] (MLA's k_rope)
        torch.testing.assert_close(got.double(), _rope_reference(x, cos, sin, interleaved), rtol=1e-6, atol=1e-6)
        assert fused_ops.rope(x, cos, sin, interleaved, out=x) is x  # in place
        assert torch.equal(x, want) and torch.equal(whole[..., d:], tail)  # the columns past the head untouched


@needs_kernels
def test_rope_declines_what_it_cannot_take():
    cos = torch.ones(2, 4)
    assert fused_ops.rope(torch.randn(2, 3, 8), cos, cos, False) is not None  # the control for the cases below
    assert fused_ops.rope(torch.randn(2, 3, 8, dtype=torch.float64), cos, cos, False) is None
    assert fused_ops.rope(torch.randn(2, 3, 8, requires_grad=True), cos, cos, False) is None  # autograd must see it
    assert fused_ops.rope(torch.randn(2, 1, 3, 8), cos, cos, False) is None  # [b, s, h, d]: Rotary's torch path
    assert fused_ops.rope(torch.randn(2, 3, 8).transpose(1, 2).transpose(1, 2)[..., ::2], cos[:, :2], cos[:, :2],
                          False) is None  # strided values within a head


@needs_kernels
def test_silu_mul_is_as_close_to_exact_as_torch():
    """SwiGLU's silu(gate) * up: against fp64, no further than torch's own fp32 silu, over the range where silu is
    neither 0 nor x within fp32, and at the clamps of its exp (huge gates, zeros, infinities)."""
    gate = torch.cat([torch.linspace(-87, 40, 50001), torch.tensor([0.0, -0.0, 1e4, -1e4, 88.5, -88.5, float("inf")])])
    up = torch.randn(gate.shape, generator=torch.Generator().manual_seed(0))
    got = fused_ops.silu_mul(torch.cat([gate, up])[None], gate.numel())[0]
    exact = (gate.double() / (1 + torch.exp(-gate.double()))).nan_to_num() * up.double()
    torch_err = ((F.silu(gate) * up).double() - exact).abs()
    err = (got.double() - exact).abs()
    ulp = exact.abs().float().nextafter(torch.tensor(float("inf"))).double() - exact.abs()
    n = 50001  # the linspace: relative error; past it, values under fp32's normal range are equal to within 1e-30
    ulps, torch_ulps = err[:n] / ulp[:n], torch_err[:n] / ulp[:n]  # measured: max 3.0 and mean 0.46 for both
    assert ulps.max() <= max(torch_ulps.max(), 1.0) and ulps.mean() <= torch_ulps.mean() * 1.05
    assert (err[n:-1] <= 1e-30 + 1e-7 * exact[n:-1].abs()).all()
    assert got[-1] == up[-1] * float("inf")  # silu(inf) = inf
    rows = torch.randn(3, 2, 64)  # leading dims kept; torch's formula where the kernel cannot run (autograd)
    assert fused_ops.silu_mul(rows, 32).shape == (3, 2, 32)
    g = torch.randn(2, 8, requires_grad=True)
    fused_ops.silu_mul(g, 4).sum().backward()
    assert g.grad is not None


@needs_kernels
def test_every_isa_level_gives_the_same_bits(kernel_env):
    """The library of each level this CPU runs (as SELFSEEK_ISA would pick it): bitwise equal outputs."""
    g = torch.Generator().manual_seed(0)
    r, x, w = torch.randn(3, 300, generator=g), torch.randn(3, 300, generator=g), torch.randn(300, generator=g)
    q, positions = torch.randn(2, 3, 64, generator=g), torch.tensor([5, 900])
    cos, sin = Rotary(RopeConfig(theta=10000.0), 64, interleaved=False).cos_sin(positions)
    outs = {}
    for isa in build.supported_isas():
        kernel_env(SELFSEEK_ISA=isa)
        res, qr = r.clone(), q.clone()
        out = fused_ops.add_rms_norm(x, res, w, 1e-6)
        assert fused_ops.rope(qr, cos, sin, False, out=qr) is qr
        streams, fn, base, scale, y = _hc_case(3, 4, 40, 1)
        hc = fused_ops.hc_pre(streams.flatten(1) @ fn.T, streams, base, scale, 1e-6, 1e-6, 20)
        att = fused_ops.sink_attention(q, r[:, :64].contiguous(), r[:2, :3] > 0, w[:3].contiguous(), 0.1,
                                       (x[:, :128].reshape(2, 3, 64), x[:2, :3] > 0))
        act = fused_ops.silu_mul(torch.cat([x * 9, r], dim=1), 300)  # the vector loop and its scalar tail
        best = torch.tensor([i for c in _argmax_cases()[5:] for i in fused_ops.argmax_rows(c)])
        outs[isa] = (out, res, qr, fused_ops.rope(q, cos, sin, True), *hc, fused_ops.hc_post(hc[0], hc[1], streams, y),
                     att, act, best)
    first = next(iter(outs.values()))
    for isa, got in outs.items():
        assert all(torch.equal(a, b) for a, b in zip(got, first, strict=True)), isa


def _argmax_cases() -> list[torch.Tensor]:
    """Rows the one-pass lanes could get wrong: ties within a lane and across lanes (the first wins), -0 against +0,
    NaN anywhere (the first NaN wins), all -inf, +inf, lengths around the 16-lane step, strided rows."""
    g = torch.Generator().manual_seed(3)
    inf, nan = float("inf"), float("nan")
    out = [torch.randn(r, n, generator=g) for r, n in ((1, 1), (3, 5), (2, 15), (2, 16), (4, 17), (5, 129280))]
    tied = torch.randn(6, 100, generator=g)
    tied[0, [3, 19, 35]] = 9.0  # the same lane
    tied[1, [40, 7]] = 9.0  # another lane first
    tied[2, [97, 98]] = 9.0  # in the scalar tail
    tied[3, [20, 2]] = 9.0
    tied[4] = -inf
    tied[5, [10, 60]] = inf
    out.append(tied)
    zeros = torch.full((2, 40), -1.0)
    zeros[0, 21], zeros[0, 5], zeros[1, 5], zeros[1, 21] = 0.0, -0.0, 0.0, -0.0
    out.append(zeros)
    nans = torch.randn(5, 70, generator=g)
    nans[0, 50], nans[1, 0], nans[2, 69], nans[3, [30, 12]], nans[4] = nan, nan, nan, nan, nan
    out.append(nans)
    out.append(torch.randn(4, 64, generator=g)[:, 3:50])  # rows of 47 at a stride of 64
    return out


@needs_kernels
def test_argmax_rows_is_torchs_max_indices():
    for x in _argmax_cases():
        assert fused_ops.argmax_rows(x) == x.max(dim=-1).indices.tolist(), x.shape
    half = torch.randn(3, 50).to(torch.bfloat16)  # not float32: torch's own
    assert fused_ops.argmax_rows(half) == half.max(dim=-1).indices.tolist()


def _hc_reference(streams, fn, base, scale, norm_eps, hc_eps, iters):
    """DeepSeek-V4's mHC weights as transformers writes them, in float64: pre / post / Sinkhorn-projected comb, then
    the block input sum_j pre_j X_j."""
    x, n = streams.double(), streams.shape[1]
    flat = x.flatten(1)
    mix = (flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + norm_eps)) @ fn.double().T
    b, s = base.double(), scale.double()
    pre = torch.sigmoid(mix[:, :n] * s[0] + b[:n]) + hc_eps
    post = 2 * torch.sigmoid(mix[:, n : 2 * n] * s[1] + b[n : 2 * n])
    comb = torch.softmax((mix[:, 2 * n :] * s[2] + b[2 * n :]).view(-1, n, n), dim=-1) + hc_eps
    comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    return post, comb, (pre[..., None] * x).sum(1)


def _hc_case(rows, n, m, seed):
    g = torch.Generator().manual_seed(seed)
    streams = torch.randn(rows, n, m, generator=g) * 2
    fn = torch.randn((2 + n) * n, n * m, generator=g) * 0.1
    base, scale = torch.randn((2 + n) * n, generator=g), torch.rand(3, generator=g) * 2
    return streams, fn, base, scale, torch.randn(rows, m, generator=g)


@needs_kernels
@pytest.mark.parametrize("rows,n,m,iters", [(1, 4, 512, 20), (3, 3, 100, 1), (20, 4, 64, 20), (2, 1, 7, 0)])
def test_hyper_connection_matches_reference(rows, n, m, iters, kernel_env):
    """The mHC kernels against the float64 formula, no further from it than the torch path (deepseek_v4's fallback)."""
    from selfseek.config import V4Config
    from selfseek.models.deepseek_v4 import HyperConnection

    streams, fn, base, scale, y = _hc_case(rows, n, m, rows * m)
    want = _hc_reference(streams, fn, base, scale, 1e-6, 1e-6, iters)
    want_out = want[0][..., None] * y.double()[:, None] + torch.einsum("tjk,tjm->tkm", want[1], streams.double())
    # the mix GEMM is an input: rounded once from float64 it leaves the kernel's own error against the formula
    # (an fp32 GEMM's summation order alone moves the merged output by 1e-5 on some BLAS paths)
    exact_mix = (streams.double().flatten(1) @ fn.double().T).float()
    got = fused_ops.hc_pre(exact_mix, streams, base, scale, 1e-6, 1e-6, iters)
    assert got is not None
    out = fused_ops.hc_post(got[0], got[1], streams, y)
    mix = streams.flatten(1) @ fn.T  # the torch path's own fp32 mix, for the like-for-like comparison
    got32 = fused_ops.hc_pre(mix, streams, base, scale, 1e-6, 1e-6, iters)
    out32 = fused_ops.hc_post(got32[0], got32[1], streams, y)
    v4 = V4Config([], [], hc_mult=n, hc_sinkhorn_iters=iters, hc_eps=1e-6)
    cfg = SimpleNamespace(v4=v4, rms_norm_eps=1e-6, hidden_size=m)
    hc = HyperConnection(cfg)
    with torch.no_grad():
        hc.fn.copy_(fn), hc.base.copy_(base), hc.scale.copy_(scale)
        kernel_env(SELFSEEK_NO_KERNELS="1")
        post, comb, block_input = hc(streams)
        eager = (post, comb, block_input, HyperConnection.merge(post, comb, streams, y))
    for a, a32, e, w in zip((*got, out), (*got32, out32), eager, (*want, want_out), strict=True):
        torch.testing.assert_close(a.double(), w, rtol=2e-6, atol=2e-6)
        assert (a32.double() - w).abs().max() <= 2 * (e.double() - w).abs().max() + 1e-6
    assert torch.allclose(got[1].sum(-2), torch.ones(rows, n), atol=1e-5)  # Sinkhorn's last step: columns sum to 1


@needs_kernels
def test_hyper_connection_declines_what_it_cannot_take():
    streams, fn, base, scale, y = _hc_case(2, 4, 16, 0)
    mix = streams.flatten(1) @ fn.T
    assert fused_ops.hc_pre(mix, streams, base, scale, 1e-6, 1e-6, 20) is not None  # the control for the cases below
    assert fused_ops.hc_post(torch.ones(2, 4), torch.ones(2, 4, 4), torch.ones(2, 4, 16), y) is not None
    assert fused_ops.hc_pre(mix, streams.double(), base, scale, 1e-6, 1e-6, 20) is None
    assert fused_ops.hc_pre(mix, streams.transpose(1, 2).contiguous().transpose(1, 2), base, scale, 1e-6, 1e-6,
                            20) is None  # non-contiguous streams
    assert fused_ops.hc_pre(mix[:, :-1], streams, base, scale, 1e-6, 1e-6, 20) is None  # wrong mix width
    assert fused_ops.hc_pre(mix, streams.requires_grad_(), base, scale, 1e-6, 1e-6, 20) is None  # autograd
    assert fused_ops.hc_post(torch.ones(2, 4), torch.ones(2, 4, 4), torch.ones(2, 4, 16), y[:, :8]) is None


def _sink_attention_reference(q, kv, visible, sinks, scale, own, valid):
    """DeepSeek-V4's attention with sinks in float64, row by row: softmax over the row's visible shared keys, its
    valid own keys and the head's sink, then the weighted values (K = V)."""
    s, h, d = q.shape
    out = torch.zeros(s, h, d, dtype=torch.float64)
    for r in range(s):
        keys = kv.double()[visible[r]] if visible is not None else kv.double()
        if own is not None:
            keys = torch.cat([keys, own[r].double()[valid[r]]])
        for head in range(h):
            z = torch.cat([keys @ q[r, head].double() * scale, sinks[head : head + 1].double()])
            out[r, head] = torch.softmax(z, 0)[:-1] @ keys
    return out


@needs_kernels
@pytest.mark.parametrize("s,t,k,masked", [(1, 20, 0, False), (1, 9, 3, False), (5, 12, 4, True), (4, 7, 0, True)])
def test_sink_attention_matches_reference(s, t, k, masked, kernel_env):
    from selfseek.models import deepseek_v4

    g = torch.Generator().manual_seed(s * 100 + t)
    h, d = 4, 40
    q, kv, sinks = torch.randn(s, h, d, generator=g), torch.randn(t, d, generator=g), torch.randn(h, generator=g)
    visible = torch.rand(s, t, generator=g) < 0.6 if masked else None
    if masked:
        visible[0] = False  # a row seeing no shared key: the sink (and its own keys) only
    per_row = (torch.randn(s, k, d, generator=g), torch.rand(s, k, generator=g) < 0.7) if k else None
    want = _sink_attention_reference(q, kv, visible, sinks, d**-0.5, *(per_row or (None, None)))
    got = fused_ops.sink_attention(q, kv, visible, sinks, d**-0.5, per_row)
    assert got is not None
    assert torch.equal(deepseek_v4.sink_attention(q, kv, visible, sinks, d**-0.5, per_row), got)  # the model's path
    kernel_env(SELFSEEK_NO_KERNELS="1")
    eager = deepseek_v4.sink_attention(q, kv, visible, sinks, d**-0.5, per_row)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)
    assert (got.double() - want).abs().max() <= 2 * (eager.double() - want).abs().max() + 1e-6


@needs_kernels
def test_sink_attention_declines_what_it_cannot_take():
    q, kv, sinks = torch.randn(2, 3, 8), torch.randn(5, 8), torch.randn(3)
    assert fused_ops.sink_attention(q, kv, None, sinks, 1.0) is not None  # the control for the cases below
    assert fused_ops.sink_attention(q.double(), kv.double(), None, sinks.double(), 1.0) is None
    assert fused_ops.sink_attention(q, kv, torch.ones(2, 4, dtype=torch.bool), sinks, 1.0) is None  # mask shape
    assert fused_ops.sink_attention(q, kv, torch.ones(2, 5), sinks, 1.0) is None  # a float mask
    assert fused_ops.sink_attention(q.transpose(0, 1).contiguous().transpose(0, 1), kv, None, sinks, 1.0) is None
    assert fused_ops.sink_attention(q.requires_grad_(), kv, None, sinks, 1.0) is None  # autograd


@pytest.mark.parametrize("family,model_type", [("llama_linear", "llama"), ("v3_noaux", "deepseek_v3")])
def test_fused_stack_matches_layer_by_layer(family, model_type):
    """CausalLM.hidden_states with residuals fused into the norms (no grad) equals DecoderLayer.forward layer by
    layer (grad mode takes that path), and leaves the embedding output it starts from unwritten."""
    from checkpoints import tiny_model

    model = tiny_model(family, model_type)
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    assert not model._fused_residuals() or torch.is_grad_enabled()
    with torch.no_grad():
        assert model._fused_residuals()
        fused = model.hidden_states(tokens)
        emb = model.embed(tokens.reshape(-1))
    plain = model.hidden_states(tokens).detach()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.embed(tokens.reshape(-1)), emb, rtol=0, atol=0)
