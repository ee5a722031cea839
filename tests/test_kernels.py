"""The native CPU kernels (selfseek/kernels): linear over every weight storage, fused MoE, the ISA dispatch.

Every kernel is checked against a plain-torch reference written here (dequantize, then float32 math); results
agree up to fp32 summation order. Timings: `python -m selfseek.kernels.bench` (not a test).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from selfseek import kernels
from selfseek.kernels import build
from selfseek.models.quant import quantize_weight

NATIVE = kernels.available()
needs_native = pytest.mark.skipif(not NATIVE, reason="native kernels not loaded (SELFSEEK_NO_KERNELS or no compiler)")
KINDS = ["q8", "q8_mins", "q4", "f32", "bf16", "f16"]


def ref_dequantize(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> torch.Tensor:
    """The formats' definition: 32-wide blocks, w = d * q + m; q4 blocks: 16 low nibbles, then 16 high ones."""
    if q.dtype == torch.uint8:
        blocks = q.reshape(*q.shape[:-1], -1, 16).to(torch.int32)
        values = torch.cat([blocks % 16, blocks // 16], dim=-1).float()
    else:
        values = q.reshape(*q.shape[:-1], -1, 32).float()
    w = values * scales.float()[..., None]
    if mins is not None:
        w = w + mins.float()[..., None]
    return w.reshape(*q.shape[:-1], -1)


def make_weight(kind: str, *shape: int, seed: int = 0) -> tuple[kernels.Weight, torch.Tensor]:
    """A weight of `kind` and its exact float32 value."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.05
    if kind.startswith("q"):
        flat = w.reshape(-1, shape[-1])
        q, d, m = quantize_weight(flat, 4 if kind == "q4" else 8)
        if kind == "q8_mins":  # Q5_K-style int8 with per-block offsets
            m = (torch.randn(d.shape, generator=g) * 0.01).half()
        lead = shape[:-1]
        q, d = q.reshape(*lead, -1), d.reshape(*lead, -1)
        m = None if m is None else m.reshape(*lead, -1)
        return (q, d, m), ref_dequantize(q, d, m)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[kind]
    return w.to(dtype), w.to(dtype).float()


def close(got: torch.Tensor, want: torch.Tensor, scale: float = 1.0) -> None:
    """Equal up to fp32 summation order, relative to the magnitude of the terms summed."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= 2e-5 * scale + 1e-6, f"max error {err}"


@pytest.fixture
def torch_fallback(monkeypatch):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_loaded", True)


@needs_native
@pytest.mark.parametrize("kind", KINDS)
def test_linear_matches_the_reference_for_every_batch_size(kind):
    k = 100 if kind in ("f32", "bf16", "f16") else 96  # float kinds: a tail past the last 32-block too
    w, ref = make_weight(kind, 37, k)
    torch.manual_seed(1)
    for rows in (1, 2, 3, 4, 5, 7, 9, kernels.GEMM_MIN_ROWS + 3):
        x = torch.randn(rows, k)
        close(kernels.linear(x, w), x @ ref.T, scale=k**0.5)
    x = torch.randn(2, 3, k)  # leading dims are kept
    assert kernels.linear(x, w).shape == (2, 3, 37)


@needs_native
@pytest.mark.parametrize("kind", ["q8", "q8_mins", "q4", "bf16"])
def test_dequantize_and_row_gather_are_exact(kind):
    w, ref = make_weight(kind, 40, 64)
    # one rounding (fused d * q + m) against torch's two: equal to the last bit or one ulp
    torch.testing.assert_close(kernels.to_float(w), ref, rtol=1e-6, atol=1e-7)
    ids = torch.tensor([[3, 0], [39, 3]])
    torch.testing.assert_close(kernels.gather_rows(w, ids), ref[ids], rtol=1e-6, atol=1e-7)
    with pytest.raises(IndexError, match="out of range"):
        kernels.gather_rows(w, torch.tensor([40]))


@pytest.mark.parametrize("kind", ["q8", "q4", "bf16"])
def test_torch_fallback_is_the_same_math(kind, torch_fallback):
    w, ref = make_weight(kind, 24, 64)
    x = torch.randn(5, 64)
    close(kernels.linear(x, w), x @ ref.T, scale=8)
    torch.testing.assert_close(kernels.gather_rows(w, torch.tensor([2, 2, 7])), ref[[2, 2, 7]])


def test_malformed_weights_are_named_errors():
    (q, d, m), _ = make_weight("q4", 8, 64)
    with pytest.raises(ValueError, match="mins"):
        kernels.linear(torch.randn(1, 64), (q, d, None))
    with pytest.raises(ValueError, match="scales"):
        kernels.linear(torch.randn(1, 64), (q, d.float(), m))
    with pytest.raises(TypeError, match="q4=False"):
        kernels.quant_linear(torch.randn(1, 64), q, d, m, False)
    with pytest.raises(ValueError, match="features"):
        kernels.linear(torch.randn(1, 32), (q, d, m))


def ref_moe(x, weights, ids, gate, up, down):
    """Token by token, slot by slot: y[t] = sum_j w[t,j] down_e(silu(gate_e x) * up_e x)."""
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = F.silu(gate[e] @ x[t]) * (up[e] @ x[t])
            y[t] += weights[t, j] * (down[e] @ h)
    return y


@needs_native
@pytest.mark.parametrize("kind", KINDS)
def test_fused_moe_matches_the_reference_loop(kind):
    n_experts, hidden, inter = 6, 64, 96
    gate, gate_ref = make_weight(kind, n_experts, inter, hidden, seed=1)
    up, up_ref = make_weight(kind, n_experts, inter, hidden, seed=2)
    down, down_ref = make_weight(kind, n_experts, hidden, inter, seed=3)
    g = torch.Generator().manual_seed(4)
    for n, k in ((1, 2), (3, 1), (19, 3)):
        x = torch.randn(n, hidden, generator=g)
        ids = torch.stack([torch.randperm(n_experts - 1, generator=g)[:k] for _ in range(n)])  # expert 5 idle
        weights = torch.rand(n, k, generator=g)
        y = kernels.moe(x, weights, ids, gate, up, down)
        close(y, ref_moe(x, weights, ids, gate_ref, up_ref, down_ref), scale=10)
    with pytest.raises(IndexError, match="expert id"):
        kernels.moe(x, weights, ids + n_experts, gate, up, down)


@needs_native
def test_fused_moe_layer_equals_its_torch_path():
    """Experts.forward (fused) against Experts._forward_torch, the path CUDA and training take."""
    from types import SimpleNamespace

    from selfseek.models.moe import Experts

    experts = Experts(SimpleNamespace(n_routed_experts=8, moe_intermediate_size=32, hidden_size=64))
    torch.manual_seed(0)
    for p in experts.parameters():
        p.data.normal_(0, 0.1)
    x, weights = torch.randn(9, 64), torch.rand(9, 2)
    ids = torch.randint(0, 8, (9, 2))
    with torch.no_grad():
        close(experts(x, weights, ids), experts._forward_torch(x, weights, ids), scale=4)


def _isa_results() -> dict:
    out = {}
    for kind in ("q8", "q8_mins", "q4", "bf16", "f16", "f32"):
        w, _ = make_weight(kind, 33, 96)
        x = torch.randn(5, 96, generator=torch.Generator().manual_seed(0))
        s, _ = make_weight(kind, 4, 96, 96, seed=1)
        ids = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [1, 3]])
        out[kind] = [kernels.linear(x[:1], w), kernels.linear(x, w), kernels.moe(x, torch.ones(5, 2), ids, s, s, s)]
    return out


def _same(got: dict, want: dict) -> None:
    for key, values in want.items():
        for a, b in zip(got[key], values, strict=True):
            close(a, b, scale=10)


@needs_native
def test_every_level_this_cpu_runs_gives_the_same_results(monkeypatch):
    want = _isa_results()
    for isa in build.supported_isas():
        monkeypatch.setattr(kernels, "_lib", kernels.bind(ctypes.CDLL(str(build.build("quant", isa)))))
        _same(_isa_results(), want)


@needs_native
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_selfseek_isa_forces_a_path(isa, tmp_path):
    if isa not in build.supported_isas():
        pytest.skip(f"this CPU does not run {isa}")
    env = {k: v for k, v in os.environ.items() if k != "SELFSEEK_NO_KERNELS"}
    env["SELFSEEK_ISA"] = isa
    script = (f"import sys, torch; sys.path.insert(0, {os.path.dirname(__file__)!r}); from test_kernels import "
              "_isa_results; from selfseek.kernels import build; "
              "torch.save((build.chosen_isa(), _isa_results()), sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out.pt")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    chosen, got = torch.load(tmp_path / "out.pt")
    assert chosen == isa
    _same(got, _isa_results())


def test_bad_isa_is_a_clear_error():
    env = {**os.environ, "SELFSEEK_ISA": "avx9000"}
    env.pop("SELFSEEK_NO_KERNELS", None)
    proc = subprocess.run([sys.executable, "-c", "from selfseek import kernels; kernels.available()"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "SELFSEEK_ISA='avx9000': must be one of generic, avx2, avx512, avx512vnni" in proc.stderr


def test_every_level_compiles():
    """Paths this CPU cannot run are compiled too (as `python -m selfseek.kernels.build` does at install)."""
    paths = build.build_all(["quant"])
    assert len(paths) == len(build.buildable_isas()) and all(p.is_file() for p in paths)


def test_grouped_torch_path_equals_the_loop():
    """Experts._forward_grouped (no host sync, torch._grouped_mm) against the per-expert loop, where torch runs it."""
    from types import SimpleNamespace

    from selfseek.models import moe

    x = torch.randn(11, 64)
    if not moe._grouped_mm_runs(x, [x, x, x]):
        pytest.skip("torch._grouped_mm does not run float32 on this CPU build")
    experts = moe.Experts(SimpleNamespace(n_routed_experts=8, moe_intermediate_size=32, hidden_size=64))
    torch.manual_seed(0)
    for p in experts.parameters():
        p.data.normal_(0, 0.1)
    weights, ids = torch.rand(11, 3), torch.stack([torch.randperm(7)[:3] for _ in range(11)])  # expert 7 idle
    with torch.no_grad():
        close(experts._forward_grouped(x, weights, ids), ref_moe(x, weights, ids, experts.gate_proj,
                                                                   experts.up_proj, experts.down_proj), scale=4)


def ref_linear_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> torch.Tensor:
    """The int8-activation product's definition: x quantized per 32-block (d_x = max|x| / 127, round half to even),
    y = sum_b d_w d_x (q_w . q_x)_b + m_b sum_b x, the integer dot products exact."""
    xb = x.reshape(x.shape[0], -1, 32)
    dx = xb.abs().amax(-1) / 127
    inv = torch.where(dx > 0, 1 / dx, torch.zeros_like(dx))
    qx = torch.round(xb * inv[..., None]).to(torch.int64)
    if q.dtype == torch.uint8:
        blocks = q.reshape(q.shape[0], -1, 16).to(torch.int64)
        qw = torch.cat([blocks % 16, blocks // 16], dim=-1)
    else:
        qw = q.reshape(q.shape[0], -1, 32).to(torch.int64)
    idot = torch.einsum("rbk,nbk->rnb", qx, qw).float()  # exact: |idot| < 2^24
    y = (idot * (scales.float()[None] * dx[:, None])).sum(-1)
    if mins is not None:
        y = y + (mins.float()[None] * xb.sum(-1)[:, None]).sum(-1)
    return y


@needs_native
def test_int8_activations_match_their_reference_on_every_level(monkeypatch):
    monkeypatch.setattr(kernels, "INT8_ACTIVATIONS", True)
    g = torch.Generator().manual_seed(5)
    for isa in build.supported_isas():
        monkeypatch.setattr(kernels, "_lib", kernels.bind(ctypes.CDLL(str(build.build("quant", isa)))))
        for kind in ("q8", "q8_mins", "q4"):
            w, ref = make_weight(kind, 37, 256, seed=6)
            for rows in (1, 2, 3, 4):
                x = torch.randn(rows, 256, generator=g)
                x[0, 32:64] = 0  # an all-zero block: scale 0
                want = ref_linear_int8(x, *w)
                close(kernels.linear(x, w), want, scale=16)
                # and it is an approximation of the float product, not something else
                assert (want - x @ ref.T).abs().max() < 0.02 * (x @ ref.T).abs().max()
            x = torch.randn(kernels.INT8_MAX_ROWS + 1, 256, generator=g)  # more rows: the float path
            close(kernels.linear(x, w), x @ ref.T, scale=16)


def test_int8_activations_are_off_by_default():
    env = {k: v for k, v in os.environ.items() if k != "SELFSEEK_INT8_ACTIVATIONS"}
    code = "from selfseek import kernels; print(kernels.INT8_ACTIVATIONS)"
    for value, want in ((None, "False"), ("1", "True")):
        if value is not None:
            env["SELFSEEK_INT8_ACTIVATIONS"] = value
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.stdout.strip() == want, proc.stderr[-2000:]
