"""kernels/fused_ops: the fused residual-add + RMSNorm and in-place rotary against plain-torch references, on
every instruction-set level this CPU runs, and the fused decoder stack against the layer-by-layer one."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from selfseek.config import RopeConfig
from selfseek.kernels import build, fused_ops
from selfseek.models.layers import Rotary

needs_kernels = pytest.mark.skipif(fused_ops._load() is None, reason="fused_ops kernels unavailable")


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
def test_add_rms_norm_strided_rows_and_fallback_agree(monkeypatch):
    g = torch.Generator().manual_seed(1)
    big = torch.randn(4, 64, generator=g)
    residual, x = big[:, :32], big[:, 32:]  # rows with stride 64
    w = torch.rand(32, generator=g)
    want = F.rms_norm(residual + x, (32,), w, 1e-6)
    kernel_res = residual.clone()
    got = fused_ops.add_rms_norm(x, residual, w, 1e-6)  # writes the strided view in place
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(residual, kernel_res + x, rtol=0, atol=0)
    monkeypatch.setattr(fused_ops, "_lib", None)
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
def test_rope_is_bitwise_the_torch_rotary(rows, heads, d, interleaved):
    rot = Rotary(RopeConfig(theta=10000.0), d, interleaved=interleaved)
    g = torch.Generator().manual_seed(d)
    cos, sin = rot.cos_sin(torch.randint(0, 4000, (rows,), generator=g))
    # strided rows and heads, as q_rope inside MLA's q or q|k inside the fused qkv output
    whole = torch.randn(rows, heads, d + 5, generator=g)
    x, tail = whole[..., :d], whole[..., d:].clone()
    with torch.no_grad():
        monkey = fused_ops._lib
        fused_ops._lib = None  # Rotary.forward's torch formula: what the kernel must equal
        try:
            want = rot(x, cos, sin)
        finally:
            fused_ops._lib = monkey
        got = fused_ops.rope(x, cos, sin, interleaved)
        assert got is not None and got.is_contiguous()
        assert torch.equal(got, want)
        assert torch.equal(rot(x, cos, sin), want)  # Rotary.forward through the kernel
        assert torch.equal(fused_ops.rope(x[:, 0], cos, sin, interleaved), want[:, 0])  # [T, d] (MLA's k_rope)
        torch.testing.assert_close(got.double(), _rope_reference(x, cos, sin, interleaved), rtol=1e-6, atol=1e-6)
        assert fused_ops.rope(x, cos, sin, interleaved, out=x) is x  # in place
        assert torch.equal(x, want) and torch.equal(whole[..., d:], tail)  # the columns past the head untouched


def test_rope_declines_what_it_cannot_take():
    cos = torch.ones(2, 4)
    assert fused_ops.rope(torch.randn(2, 3, 8, dtype=torch.float64), cos, cos, False) is None
    assert fused_ops.rope(torch.randn(2, 3, 8, requires_grad=True), cos, cos, False) is None  # autograd must see it
    assert fused_ops.rope(torch.randn(2, 1, 3, 8), cos, cos, False) is None  # [b, s, h, d]: Rotary's torch path
    assert fused_ops.rope(torch.randn(2, 3, 8).transpose(1, 2).transpose(1, 2)[..., ::2], cos[:, :2], cos[:, :2],
                          False) is None  # strided values within a head


@needs_kernels
def test_every_isa_level_gives_the_same_bits(monkeypatch):
    """The library of each level this CPU runs (as SELFSEEK_ISA would pick it): bitwise equal outputs."""
    g = torch.Generator().manual_seed(0)
    r, x, w = torch.randn(3, 300, generator=g), torch.randn(3, 300, generator=g), torch.randn(300, generator=g)
    q, positions = torch.randn(2, 3, 64, generator=g), torch.tensor([5, 900])
    cos, sin = Rotary(RopeConfig(theta=10000.0), 64, interleaved=False).cos_sin(positions)
    outs = {}
    for isa in build.supported_isas():
        monkeypatch.setattr(fused_ops, "_lib", fused_ops.bind(ctypes.CDLL(str(build.build("fused_ops", isa)))))
        res, qr = r.clone(), q.clone()
        out = fused_ops.add_rms_norm(x, res, w, 1e-6)
        assert fused_ops.rope(qr, cos, sin, False, out=qr) is qr
        outs[isa] = (out, res, qr, fused_ops.rope(q, cos, sin, True))
    first = next(iter(outs.values()))
    for isa, got in outs.items():
        assert all(torch.equal(a, b) for a, b in zip(got, first, strict=True)), isa


@pytest.mark.parametrize("family,model_type", [("llama_linear", "llama"), ("v3_noaux", "deepseek_v3")])
def test_fused_stack_matches_layer_by_layer(family, model_type):
    """CausalLM.hidden_states with residuals fused into the norms (no grad) equals DecoderLayer.forward layer by
    layer (grad mode takes that path), and leaves the embedding output it starts from unwritten."""
    from test_attention import tiny_model

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
