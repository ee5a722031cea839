"""The native CPU kernels (selfseek/kernels): linear over every weight storage, fused MoE, the ISA dispatch.

Every kernel is checked against a plain-torch reference written here (dequantize, then float32 math); results
agree up to fp32 summation order. Timings: `python -m selfseek.kernels.bench` (not a test).
"""

from __future__ import annotations

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
def torch_fallback(kernel_env):
    kernel_env(SELFSEEK_NO_KERNELS="1")
    assert not kernels.available()


@needs_native
@pytest.mark.parametrize("gemm", ["blas", "panels"])
@pytest.mark.parametrize("kind", KINDS)
def test_linear_matches_the_reference_for_every_batch_size(kind, gemm, kernel_env):
    """Every row count, with the compute-bound products (GEMM_MIN_ROWS rows on) through BLAS on dequantized tiles
    and through the kernels' own weight panels (SELFSEEK_GEMM; which one a CPU takes: build.panels_for_gemm)."""
    kernel_env(SELFSEEK_GEMM=gemm)
    k = 100 if kind in ("f32", "bf16", "f16") else 96  # float kinds: a tail past the last 32-block too
    w, ref = make_weight(kind, 37, k)
    torch.manual_seed(1)
    for rows in (1, 2, 3, 4, 5, 7, 9, kernels.GEMM_MIN_ROWS + 3):
        x = torch.randn(rows, k)
        close(kernels.linear(x, w), x @ ref.T, scale=k**0.5)
    x = torch.randn(2, 3, k)  # leading dims are kept
    assert kernels.linear(x, w).shape == (2, 3, 37)


@needs_native
def test_float_linear_layers_run_in_the_kernels_only_where_nothing_else_must_run(monkeypatch):
    """layers.run_linear: a float32 nn.Linear at inference goes through kernels.linear (its bias added after), but
    autograd, a forward hook or another layer class gets the module call."""
    from torch import nn

    from selfseek.models.layers import run_linear

    calls = []
    real = kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.manual_seed(3)
    layer, x = nn.Linear(96, 40), torch.randn(3, 96)
    with torch.no_grad():
        want = layer(x)
        close(run_linear(layer, x), want, scale=96**0.5)
        assert len(calls) == 1
        seen = []
        handle = layer.register_forward_hook(lambda mod, a, out: seen.append(out))
        assert torch.equal(run_linear(layer, x), want) and len(seen) == 1 and len(calls) == 1
        handle.remove()
        half = nn.Linear(96, 40).to(torch.bfloat16)
        assert torch.equal(run_linear(half, x.bfloat16()), half(x.bfloat16())) and len(calls) == 1
    y = run_linear(layer, x)  # autograd records: the module, so the gradient reaches the weight
    y.sum().backward()
    assert len(calls) == 1 and layer.weight.grad is not None
    # a packed layer runs its own forward, and its dequantizing `weight` property is never read on the way
    from selfseek.models.quant import QuantLinear

    packed = QuantLinear(96, 40, 8)
    with torch.no_grad():
        packed.set_from_float(torch.randn(40, 96))
        monkeypatch.setattr(kernels, "to_float", lambda *a, **kw: pytest.fail("run_linear dequantized the weight"))
        assert torch.equal(run_linear(packed, x), packed(x))


@needs_native
@pytest.mark.parametrize("kind", ["q8", "q8_mins", "q4", "bf16", "f16"])
def test_several_rows_through_weight_panels(kind):
    """From 6 rows of x on, weights are widened 512 columns at a time into a float panel shared by all rows
    (quant.cpp, rows_panel): rows of three panels, the last partial, every tail of 4-row and 3-weight-row tiles."""
    k = 512 * 2 + 96
    w, ref = make_weight(kind, 41, k)
    torch.manual_seed(2)
    for rows in (6, 7, 8, 9, 10, 11, 16, kernels.GEMM_MIN_ROWS - 1):
        x = torch.randn(rows, k)
        close(kernels.linear(x, w), x @ ref.T, scale=k**0.5)


@needs_native
@pytest.mark.parametrize("kind", [*KINDS, "q4_k", "fp8"])
def test_per_head_products_match_the_reference_on_every_level(kind, kernel_env):
    """kernels.heads (MLA's absorbed W^UK and W^UV from kv_b_proj's stored rows): every head's slice of rows, in both
    directions, equals the float weight's einsum up to summation order, for one row and for several."""
    H, d, v = 3, 40, 24  # rows per head 64: W^UK the first 40, W^UV the last 24
    cols = 256 if kind == "q4_k" else 96
    w, ref = make_packed(kind, H * (d + v), cols) if kind in PACKED else make_weight(kind, H * (d + v), cols)
    per_head = ref.view(H, d + v, cols)
    g = torch.Generator().manual_seed(2)
    scale = (ref.abs().max() * cols**0.5).item()
    for isa in build.supported_isas():
        kernel_env(SELFSEEK_ISA=isa)
        for R in (1, 5):
            q = torch.randn(R, H, d, generator=g)
            o = torch.randn(R, H, cols, generator=g).transpose(0, 1).contiguous().transpose(0, 1)  # any strides
            close(kernels.heads(q, w, d + v, 0, d, True), torch.einsum("rhd,hdc->rhc", q, per_head[:, :d]), scale)
            close(kernels.heads(o, w, d + v, d, v, False), torch.einsum("rhc,hvc->rhv", o, per_head[:, d:]), scale)
    with pytest.raises(ValueError, match="heads"):
        kernels.heads(torch.randn(1, H + 1, d), w, d + v, 0, d, True)  # 4 heads of 64 rows: not this weight


@needs_native
@pytest.mark.parametrize("kind", ["q8", "q4", "q4_k"])
def test_per_head_products_take_int8_activations_for_w_uv(kind, monkeypatch, kernel_env):
    """With int8 activations, W^UV's per-head products are `linear`'s int8 products of each head's rows (up to 63 rows
    of x, as `linear`); W^UK keeps float activations: bit for bit the float result."""
    H, d, v = 3, 40, 32
    cols = 256
    w, ref = make_packed(kind, H * (d + v), cols) if kind in PACKED else make_weight(kind, H * (d + v), cols)

    def rows(a: int, b: int) -> kernels.Weight:
        if isinstance(w, kernels.Packed):
            return kernels.Packed(w.format, w.data[a:b], w.scales[a:b], w.cols)
        return tuple(None if t is None else t[a:b] for t in w)

    g = torch.Generator().manual_seed(3)
    for isa in build.supported_isas():
        kernel_env(SELFSEEK_ISA=isa)
        for R in (1, 2, 5, 16):
            q, o = torch.randn(R, H, d, generator=g), torch.randn(R, H, cols, generator=g)
            monkeypatch.setattr(kernels, "INT8_ACTIVATIONS", False)
            uk, uv = kernels.heads(q, w, d + v, 0, d, True), kernels.heads(o, w, d + v, d, v, False)
            monkeypatch.setattr(kernels, "INT8_ACTIVATIONS", True)
            assert torch.equal(kernels.heads(q, w, d + v, 0, d, True), uk), isa
            got = kernels.heads(o, w, d + v, d, v, False)
            want = torch.stack([kernels.linear(o[:, h], rows(h * (d + v) + d, (h + 1) * (d + v))) for h in range(H)], 1)
            close(got, want, scale=(ref.abs().max() * cols**0.5).item())
            assert 0 < (got - uv).abs().max() < 0.02 * uv.abs().max(), isa  # int8, close to the float product


@needs_native
def test_long_rows_match_the_reference_on_every_level(kernel_env):
    """Rows longer than one chunk of scales (64 blocks) with a partial last chunk: decode's one-row stream (several
    accumulators, prefetch) and the row tiles, on every level this CPU runs."""
    for isa in build.supported_isas():
        kernel_env(SELFSEEK_ISA=isa)
        for kind in KINDS:
            k = 32 * 70 + (5 if kind in ("f32", "bf16", "f16") else 0)
            w, ref = make_weight(kind, 9, k)
            x = torch.randn(3, k, generator=torch.Generator().manual_seed(2))
            for rows in (1, 3):
                close(kernels.linear(x[:rows], w), x[:rows] @ ref.T, scale=k**0.5)


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


@needs_native
@pytest.mark.parametrize("kind", ["q8", "q4"])
def test_moe_prefill_equals_the_fused_kernel(kind, kernel_env):
    """Many tokens with packed stacks: busy experts through dequantized weights and torch's GEMM, the few-token ones
    through the fused kernel, summed per token; the same as the fused kernel over all of them. Where the kernels'
    panels take compute-bound products (SELFSEEK_GEMM=panels), the layer gives all of them to the fused kernel."""
    from types import SimpleNamespace

    from selfseek.models.moe import Experts
    from selfseek.models.quant import QuantStack

    n_experts, hidden, inter, n, k = 8, 256, 256, 96, 3
    experts = Experts(SimpleNamespace(n_routed_experts=n_experts, moe_intermediate_size=inter, hidden_size=hidden))
    g = torch.Generator().manual_seed(0)
    for name, (rows, cols) in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                               ("down_proj", (hidden, inter))):
        w = torch.randn(n_experts, rows, cols, generator=g) * 0.05
        stack = QuantStack(n_experts, cols, rows, int(kind[1]))
        for e in range(n_experts):
            stack.set_from_float(e, w[e])
        del experts._parameters[name]  # as quantize_model swaps a float stack for a packed one
        setattr(experts, name, stack)
    x, weights = torch.randn(n, hidden, generator=g), torch.rand(n, k, generator=g)
    # experts 0-2 busy, every 8th token's last choice one of the rare 3-6, expert 7 idle
    ids = torch.stack([torch.randperm(3, generator=g) for _ in range(n)])
    ids[::8, 2] = 3 + torch.arange(0, n, 8) % 4
    counts = torch.bincount(ids.flatten(), minlength=n_experts)
    assert counts[:3].min() >= Experts.GEMM_MIN_TOKENS and 0 < counts[3:7].max() < Experts.GEMM_MIN_TOKENS
    assert n >= kernels.GEMM_MIN_ROWS
    stacks = [experts._stack(p) for p in ("gate_proj", "up_proj", "down_proj")]
    with torch.no_grad():
        kernel_env(SELFSEEK_GEMM="panels")
        assert torch.equal(experts(x, weights, ids), kernels.moe(x, weights, ids, *stacks))
        kernel_env(SELFSEEK_GEMM="blas")
        got = experts._forward_prefill(x, weights, ids, stacks)
        assert torch.equal(experts(x, weights, ids), got)  # the layer takes this path for these many tokens
        close(got, kernels.moe(x, weights, ids, *stacks), scale=4)
        # the GEMM experts side by side on 2 threads (one each) add up exactly as one after the other on 1
        threads = torch.get_num_threads()
        try:
            by_thread = {}
            for t in (1, 2):
                torch.set_num_threads(t)
                by_thread[t] = experts._forward_prefill(x, weights, ids, stacks)
                assert torch.get_num_threads() == t  # the pool's workers leave the caller's count as it was
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(by_thread[1], by_thread[2])


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
def test_every_level_this_cpu_runs_gives_the_same_results(kernel_env):
    want = _isa_results()
    for isa in build.supported_isas():
        kernel_env(SELFSEEK_ISA=isa)
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


def test_panels_for_gemm_follows_the_cpu_or_selfseek_gemm(kernel_env, monkeypatch):
    """Prefill products of packed weights: the kernels' panels on an AMD CPU running the AVX-512 kernels, BLAS
    elsewhere, unless SELFSEEK_GEMM says; a bad value is a clear error."""
    kernel_env(SELFSEEK_GEMM=None)
    for isa, vendor, want in [("avx512vnni", "AuthenticAMD", True), ("avx512", "AuthenticAMD", True),
                              ("avx2", "AuthenticAMD", False), ("avx512vnni", "GenuineIntel", False),
                              ("generic", "", False)]:
        monkeypatch.setattr(build, "chosen_isa", lambda isa=isa: isa)
        monkeypatch.setattr(build, "_cpuinfo", lambda field, vendor=vendor: vendor if field == "vendor_id" else "")
        build.reset()
        assert build.panels_for_gemm() is want, (isa, vendor)
    kernel_env(SELFSEEK_GEMM="blas")
    assert build.panels_for_gemm() is False
    kernel_env(SELFSEEK_GEMM="panels")  # only the kinds that have panels; f32 is torch.mm's as it is
    assert [kernels.gemm_by_panels(make_weight(k, 4, 64)[0]) for k in KINDS] == [True, True, True, False, True, True]
    assert not kernels.gemm_by_panels(make_packed("q4_k", 4, 256)[0])
    kernel_env(SELFSEEK_GEMM="gemv")
    with pytest.raises(build.KernelBuildError, match="SELFSEEK_GEMM='gemv': must be panels or blas"):
        build.panels_for_gemm()


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


def test_a_shared_header_is_part_of_every_library_key(tmp_path, monkeypatch):
    """A library built before a change to a header it includes is not loaded after it."""
    for f in ("quant.cpp", "buf.h"):
        (tmp_path / f).write_bytes((build.HERE / f).read_bytes())
    monkeypatch.setattr(build, "HERE", tmp_path)
    before = build.library_path("quant", "avx2")
    (tmp_path / "buf.h").write_text((tmp_path / "buf.h").read_text() + "\n// changed\n")
    assert build.library_path("quant", "avx2") != before


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
def test_int8_activations_match_their_reference_on_every_level(monkeypatch, kernel_env):
    monkeypatch.setattr(kernels, "INT8_ACTIVATIONS", True)
    g = torch.Generator().manual_seed(5)
    for isa in build.supported_isas():
        kernel_env(SELFSEEK_ISA=isa)
        for kind in ("q8", "q8_mins", "q4"):
            w, ref = make_weight(kind, 37, 256, seed=6)  # 37: two 16-row tiles and a tail of 5
            # every 16-row pass size, tails past 16 and 32; 63 and 100 on either side of AVX2's limit (VNNI has none)
            for rows in [*range(1, 18), 31, 63, 100]:
                x = torch.randn(rows, 256, generator=g)
                x[0, 32:64] = 0  # an all-zero block: scale 0
                if rows > kernels.int8_max_rows():  # more rows than this level's int8 products take: the float path
                    close(kernels.linear(x, w), x @ ref.T, scale=16)
                    continue
                want = ref_linear_int8(x, *w)
                close(kernels.linear(x, w), want, scale=16)
                # and it is an approximation of the float product, not something else
                assert (want - x @ ref.T).abs().max() < 0.02 * (x @ ref.T).abs().max()
            # a row longer than one chunk of scales (64 blocks): the row kernels' later chunks
            w, ref = make_weight(kind, 5, 32 * 65, seed=8)
            for rows in (1, 2, 3):
                x = torch.randn(rows, 32 * 65, generator=g)
                close(kernels.linear(x, w), ref_linear_int8(x, *w), scale=64)


def test_int8_activations_are_off_by_default():
    env = {k: v for k, v in os.environ.items() if k != "SELFSEEK_INT8_ACTIVATIONS"}
    code = "from selfseek import kernels; print(kernels.INT8_ACTIVATIONS)"
    for value, want in ((None, "False"), ("1", "True")):
        if value is not None:
            env["SELFSEEK_INT8_ACTIVATIONS"] = value
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.stdout.strip() == want, proc.stderr[-2000:]


# ---------------------------------------------------------------- packed formats: GGUF K-quants, FP8, FP4

K_QUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
PACKED = [*K_QUANTS, "fp8", "fp4"]
_FP16_FIELDS = {"q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def ref_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek's weight_dequant: w[r, c] * scale_inv[r // block[0], c // block[1]] in fp32."""
    s = scale_inv.float().repeat_interleave(block[0], 0)[: w.shape[0]].repeat_interleave(block[1], 1)[:, : w.shape[1]]
    return w.float() * s


def ref_fp4(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """transformers' FP4 unpack: byte -> (E2M1[low nibble], E2M1[high nibble]), times 2^(e - 127) per 32 values."""
    u8 = w.view(torch.uint8).long()
    v = torch.stack([torch.tensor(E2M1)[u8 & 15], torch.tensor(E2M1)[u8 >> 4]], -1).reshape(w.shape[0], -1)
    return v * (scale.view(torch.uint8).float() - 127).exp2().repeat_interleave(32, 1)


def make_packed(fmt: str, rows: int, cols: int, seed: int = 0) -> tuple[kernels.Packed, torch.Tensor]:
    """A random weight of a packed format and its float32 value by the reference (gguf.quants for K-quants): random
    bytes reach every quant-index and scale pattern; the fp16 super-block scales are set to small finite values."""
    import gguf
    import numpy as np

    from selfseek.models.quant import pack_fp4, pack_fp8

    rng = np.random.default_rng(seed)
    if fmt == "fp8":
        g = torch.Generator().manual_seed(seed)
        w = (torch.randn(rows, cols, generator=g) * 100).to(torch.float8_e4m3fn)
        s = torch.rand(-(-rows // 128), -(-cols // 128), generator=g) * 1e-3
        return pack_fp8(w, s), ref_fp8(w, s, (128, 128))
    if fmt == "fp4":
        w = torch.from_numpy(rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8)).view(torch.int8)
        s = torch.from_numpy(rng.integers(118, 130, (rows, cols // 32), dtype=np.uint8)).view(torch.float8_e8m0fnu)
        return pack_fp4(w, s), ref_fp4(w, s)
    qtype = gguf.GGMLQuantizationType[fmt.upper()]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at in _FP16_FIELDS[fmt]:
        d = (rng.standard_normal((rows, cols // block)) * 0.01).astype(np.float16)
        b[:, :, at : at + 2] = d.view(np.uint8).reshape(rows, cols // block, 2)
    raw = b.reshape(rows, -1)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(rows, cols))
    return kernels.Packed(fmt, torch.from_numpy(raw), torch.empty(rows, 0, dtype=torch.uint8), cols), ref


def quantize_x_int8(x: torch.Tensor) -> torch.Tensor:
    """x as the int8-activation path sees it: rounded per 32-block to d_x * q (d_x = max|x| / 127, half to even)."""
    xb = x.reshape(x.shape[0], -1, 32)
    dx = xb.abs().amax(-1, keepdim=True) / 127
    return (torch.round(xb * torch.where(dx > 0, 1 / dx, torch.zeros_like(dx))) * dx).reshape(x.shape)


@needs_native
@pytest.mark.parametrize("fmt", ["q4_k", "q5_k", "q6_k"])
def test_int8_activations_take_the_k_quants_on_every_level(fmt, monkeypatch, kernel_env):
    """Q4_K / Q5_K / Q6_K with int8 activations: the reference's weight times x rounded per 32-block, except that the
    mins (Q4_K, Q5_K: w = d sc q - dmin m) multiply x's exact block sums, as for q8/q4 with mins."""
    import gguf

    monkeypatch.setattr(kernels, "INT8_ACTIVATIONS", True)
    cols = 512
    w, ref = make_packed(fmt, 37, cols, seed=3)
    mins = torch.zeros(37, cols)
    if fmt != "q6_k":  # the mins alone: the same super-blocks with every quant index 0 dequantize to -dmin * m
        zeroed = w.data.numpy().copy().reshape(37, cols // 256, -1)
        zeroed[:, :, 16 : 144 if fmt == "q4_k" else 176] = 0
        qtype = gguf.GGMLQuantizationType[fmt.upper()]
        mins = -torch.from_numpy(gguf.quants.dequantize(zeroed.reshape(37, -1), qtype)).float().reshape(37, cols)
    g = torch.Generator().manual_seed(7)
    scale = (ref.abs().max() * cols**0.5).item()
    for isa in build.supported_isas():
        kernel_env(SELFSEEK_ISA=isa)
        for rows in (1, 2, 3, 4, 5, 8, 17, 63, 100):  # tiles of 4 rows and their tails; AVX2's limit (63)
            x = torch.randn(rows, cols, generator=g)
            x[0, 32:64] = 0  # an all-zero block: scale 0
            if rows > kernels.int8_max_rows():  # the float path
                close(kernels.linear(x, w), x @ ref.T, scale=scale)
                continue
            want = quantize_x_int8(x) @ (ref + mins).T - x @ mins.T
            close(kernels.linear(x, w), want, scale=scale)
            assert (want - x @ ref.T).abs().max() < 0.02 * (x @ ref.T).abs().max(), isa  # close to the float product


def _packed_cols(fmt: str) -> int:
    return 512 if fmt in K_QUANTS else 320  # fp8: a last scale block of 64 columns


@needs_native
@pytest.mark.parametrize("fmt", PACKED)
def test_packed_formats_match_their_reference_on_every_level(fmt, kernel_env):
    """Every row count (one-row decode, small batches, the dequantized-tile path from GEMM_MIN_ROWS) on every level
    this CPU runs: the product equals the reference's float weight times x up to summation order, and the
    dequantized rows are the reference's values exactly (K-quants: gguf.quants.dequantize, bit for bit)."""
    cols = _packed_cols(fmt)
    w, ref = make_packed(fmt, 131, cols)  # 131 rows: fp8 scale rows of 128 and 3
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(m, cols, generator=g) for m in (1, 2, 3, 5, 9, kernels.GEMM_MIN_ROWS + 3)]
    scale = (ref.abs().max() * cols**0.5).item()
    for isa in build.supported_isas():
        kernel_env(SELFSEEK_ISA=isa)
        assert torch.equal(kernels.to_float(w), ref), isa
        ids = torch.tensor([[130, 0], [7, 7]])
        assert torch.equal(kernels.gather_rows(w, ids), ref[ids]), isa
        for gemm in ("blas", "panels"):  # the last x: GEMM_MIN_ROWS rows and more, through BLAS or the row kernel
            kernel_env(SELFSEEK_GEMM=gemm)
            for x in xs:
                close(kernels.linear(x, w), x @ ref.T, scale=scale)


def _every_code(fmt: str, rows: int, cols: int) -> tuple[kernels.Packed, torch.Tensor]:
    """fp8 / fp4 weights holding every code (fp8: all 254 non-NaN bytes, subnormals included) in every row, rotated
    per row; K-quants: random super-blocks as in make_packed."""
    from selfseek.models.quant import pack_fp4, pack_fp8

    if fmt not in ("fp8", "fp4"):
        return make_packed(fmt, rows, cols, seed=5)
    n = 256 if fmt == "fp8" else 16
    codes = torch.stack([(torch.arange(cols) * 7 + 3 * r) % n for r in range(rows)]).to(torch.uint8)
    g = torch.Generator().manual_seed(5)
    if fmt == "fp8":
        w = codes.masked_fill((codes & 0x7F) == 0x7F, 0).view(torch.float8_e4m3fn)  # e4m3fn's NaN codes -> 0
        s = torch.rand(-(-rows // 128), cols // 128, generator=g) * 1e-3
        return pack_fp8(w, s), ref_fp8(w, s, (128, 128))
    w = (codes[:, 0::2] | codes[:, 1::2] << 4).view(torch.int8)
    s = torch.randint(100, 150, (rows, cols // 32), dtype=torch.uint8, generator=g).view(torch.float8_e8m0fnu)
    return pack_fp4(w, s), ref_fp4(w, s)


@needs_native
@pytest.mark.parametrize("fmt", PACKED)
def test_packed_products_are_exact_per_weight_on_every_level(fmt, kernel_env):
    """One-hot rows of x pick single weights out of the product's register-unpacked path (fewer rows than
    GEMM_MIN_ROWS): each must be the reference's value bit for bit, on every level this CPU runs."""
    w, ref = _every_code(fmt, 9, 512)
    for isa in build.supported_isas():
        kernel_env(SELFSEEK_ISA=isa)
        for k0 in range(0, 512, 32):
            x = torch.eye(512)[k0 : k0 + 32 - (k0 // 32) % 3]  # 30 to 32 rows: the MR tile and its tails
            assert torch.equal(kernels.linear(x, w), ref.T[k0 : k0 + x.shape[0]]), (isa, k0)


@pytest.mark.parametrize("fmt", PACKED)
def test_packed_torch_fallback_is_exact(fmt, torch_fallback):
    cols = _packed_cols(fmt)
    w, ref = make_packed(fmt, 20, cols, seed=3)
    assert torch.equal(kernels.to_float(w), ref)
    assert torch.equal(kernels.gather_rows(w, torch.tensor([4, 19])), ref[[4, 19]])
    x = torch.randn(3, cols)
    close(kernels.linear(x, w), x @ ref.T, scale=(ref.abs().max() * cols**0.5).item())


def _packed_stack(fmt: str, n: int, rows: int, cols: int, seed: int) -> tuple[kernels.Packed, torch.Tensor]:
    parts = [make_packed(fmt, rows, cols, seed=seed * 10 + e) for e in range(n)]
    return (kernels.Packed(fmt, torch.stack([p.data for p, _ in parts]), torch.stack([p.scales for p, _ in parts]),
                           cols), torch.stack([r for _, r in parts]))


@needs_native
@pytest.mark.parametrize("fmt", ["q4_k", "q6_k", "fp8", "fp4"])
def test_fused_moe_runs_packed_stacks(fmt):
    n_experts, hidden, inter = 4, 256, 512
    gate, gate_ref = _packed_stack(fmt, n_experts, inter, hidden, 1)
    up, up_ref = _packed_stack(fmt, n_experts, inter, hidden, 2)
    down, down_ref = _packed_stack(fmt, n_experts, hidden, inter, 3)
    norm = max(r.abs().max().item() for r in (gate_ref, up_ref, down_ref))  # keep silu away from saturation
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, hidden, generator=g) / norm / hidden**0.5
    ids = torch.stack([torch.randperm(n_experts - 1, generator=g)[:2] for _ in range(7)])
    weights = torch.rand(7, 2, generator=g)
    assert kernels.moe_native(x, gate, up, down)
    want = ref_moe(x, weights, ids, gate_ref, up_ref, down_ref)
    close(kernels.moe(x, weights, ids, gate, up, down), want, scale=want.abs().max().item() * 10)


def _expert_weight(w: kernels.Weight, e: int) -> kernels.Weight:
    if isinstance(w, kernels.Packed):
        return kernels.Packed(w.format, w.data[e], w.scales[e], w.cols)
    return tuple(None if t is None else t[e] for t in w)


@needs_native
@pytest.mark.parametrize("kind", ["q8", "q8_0x16", "q4", "q4_k", "q6_k"])
def test_fused_moe_with_int8_activations_is_its_int8_products(kind, monkeypatch, kernel_env):
    """With int8 activations the fused kernel is, token by token, the int8 products `linear` computes (tested against
    their definition above) of each expert: x into gate and up, SwiGLU's output into down; an expert with more tokens
    than the level's int8_max_rows() multiplies float activations, as `linear` would."""
    n_experts, hidden, inter = 5, 256, 512
    stacks = [_packed_stack(kind, n_experts, r, c, seed) if kind in K_QUANTS else
              make_weight(kind.removesuffix("_0x16"), n_experts, r, c, seed=seed)
              for r, c, seed in ((inter, hidden, 1), (inter, hidden, 2), (hidden, inter, 3))]
    if kind == "q8_0x16":
        stacks = [(_x16(w), ref) for w, ref in stacks]
    (gate, gate_ref), (up, up_ref), (down, down_ref) = stacks
    norm = max(r.abs().max().item() for r in (gate_ref, up_ref, down_ref))
    g = torch.Generator().manual_seed(4)
    monkeypatch.setattr(kernels, "INT8_ACTIVATIONS", True)

    def per_token(x, weights, ids):
        y = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(ids.shape[1]):
                gate_e, up_e, down_e = (_expert_weight(s, int(ids[t, j])) for s in (gate, up, down))
                h = F.silu(kernels.linear(x[t : t + 1], gate_e)) * kernels.linear(x[t : t + 1], up_e)
                y[t] += weights[t, j] * kernels.linear(h, down_e)[0]
        return y

    for isa in build.supported_isas():
        kernel_env(SELFSEEK_ISA=isa)
        for n, k in ((1, 2), (3, 1), (13, 3)):  # 1 to 9 tokens an expert: the row kernels and the transposed tiles
            x = torch.randn(n, hidden, generator=g) * 4 / norm / hidden**0.5
            ids = torch.stack([torch.randperm(n_experts - 1, generator=g)[:k] for _ in range(n)])  # expert 4 idle
            weights = torch.rand(n, k, generator=g)
            got, want = kernels.moe(x, weights, ids, gate, up, down), per_token(x, weights, ids)
            close(got, want, scale=want.abs().max().item() * 10)
            exact = ref_moe(x, weights, ids, gate_ref, up_ref, down_ref)  # an approximation of the float layer
            assert 0 < (got - exact).abs().max() < 0.05 * exact.abs().max(), isa
        # one expert's 64 tokens: int8 products with VNNI (no limit there), float ones bit for bit without (63). Not
        # compared token by token: SwiGLU's output, summed in another order than one row's products, may round to
        # another int8 value for down (linear's int8 tests cover that many rows against their definition).
        n = 64
        x, weights = torch.randn(n, hidden, generator=g) / norm / hidden**0.5, torch.rand(n, 1, generator=g)
        ids = torch.zeros(n, 1, dtype=torch.long)
        got = kernels.moe(x, weights, ids, gate, up, down)
        monkeypatch.setattr(kernels, "INT8_ACTIVATIONS", False)
        flt = kernels.moe(x, weights, ids, gate, up, down)
        monkeypatch.setattr(kernels, "INT8_ACTIVATIONS", True)
        if n > kernels.int8_max_rows():
            assert torch.equal(got, flt), isa
            continue
        exact = ref_moe(x, weights, ids, gate_ref, up_ref, down_ref)
        assert not torch.equal(got, flt) and (got - exact).abs().max() < 0.05 * exact.abs().max(), isa


def _x16(w: kernels.QuantWeight) -> kernels.Packed:
    """A q8 weight or stack (no offsets) in the q8_0x16 layout."""
    q, d, _ = w
    return kernels.Packed("q8_0x16", kernels.interleave_q8(q, d), torch.empty(*q.shape[:-1], 0, dtype=torch.uint8),
                          q.shape[-1])


def test_q8_0x16_is_q8_reordered_and_its_torch_definition_inverts_it(torch_fallback):
    w, ref = make_weight("q8", 48, 96, seed=2)
    x16 = _x16(w)
    assert x16.data.shape == (48, 3 * 34) and not torch.equal(x16.data[:, :96].view(torch.int8), w[0])
    assert torch.equal(kernels.to_float(x16), ref)
    assert torch.equal(kernels.gather_rows(x16, torch.tensor([47, 0, 17])), ref[[47, 0, 17]])
    x = torch.randn(3, 96)
    close(kernels.linear(x, x16), x @ ref.T, scale=(ref.abs().max() * 96**0.5).item())
    stack, stack_ref = make_weight("q8", 3, 32, 64, seed=3)
    assert torch.equal(kernels.to_float(_x16(stack)[2]), stack_ref[2])


@needs_native
def test_q8_0x16_matches_q8_on_every_level(monkeypatch, kernel_env):
    """The interleaved layout holds the same weights: dequantized and gathered bit for bit, float products up to
    summation order, and with int8 activations the int8 products' definition (ref_linear_int8) for every row count:
    1, 2, 4 and 8-row passes and their tails, on every level this CPU runs (VNNI's vectors, the others' scalar code)."""
    w, ref = make_weight("q8", 48, 256, seed=6)  # three groups of 16 rows
    x16 = _x16(w)
    g = torch.Generator().manual_seed(7)
    for isa in build.supported_isas():
        kernel_env(SELFSEEK_ISA=isa)
        assert torch.equal(kernels.to_float(x16), ref), isa
        ids = torch.tensor([[47, 0], [16, 15]])
        assert torch.equal(kernels.gather_rows(x16, ids), ref[ids]), isa
        for rows in (1, 2, 3, kernels.GEMM_MIN_ROWS + 3):
            x = torch.randn(rows, 256, generator=g)
            close(kernels.linear(x, x16), x @ ref.T, scale=16)
        monkeypatch.setattr(kernels, "INT8_ACTIVATIONS", True)
        for rows in [*range(1, 18), 31]:
            x = torch.randn(rows, 256, generator=g)
            x[0, 32:64] = 0  # an all-zero block: scale 0
            close(kernels.linear(x, x16), ref_linear_int8(x, *w), scale=16)
        monkeypatch.setattr(kernels, "INT8_ACTIVATIONS", False)
    with pytest.raises(ValueError, match="q8_0x16 weight: 40 rows is not a multiple of 16"):
        kernels.linear(torch.randn(1, 64), kernels.Packed("q8_0x16", torch.zeros(40, 68, dtype=torch.uint8),
                                                          torch.empty(40, 0, dtype=torch.uint8), 64))


def test_malformed_packed_weights_are_named_errors():
    w, _ = make_packed("fp4", 8, 64)
    with pytest.raises(ValueError, match="fp4 scales must be contiguous torch.uint8 \\[8, 2\\]"):
        kernels.linear(torch.randn(1, 64), kernels.Packed("fp4", w.data, w.scales[:, :1].contiguous(), 64))
    with pytest.raises(ValueError, match="q4_k weight: in_features 64 is not a multiple of 256"):
        kernels.linear(torch.randn(1, 64), kernels.Packed("q4_k", w.data, w.scales, 64))
    with pytest.raises(ValueError, match="packed format 'q9_k'"):
        kernels.linear(torch.randn(1, 64), kernels.Packed("q9_k", w.data, w.scales, 64))


@needs_native
@pytest.mark.parametrize("name", ["paged_attention", "quant"])
def test_built_kernels_keep_their_prefetches(name):
    """GCC once compiled every software prefetch of paged_attention.cpp away (its loops' forward-progress assumption):
    the prefetches the decode kernels rely on must be in the machine code of the library this CPU loads."""
    objdump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(build.build(name, build.chosen_isa()))],
                             capture_output=True, text=True)
    if objdump.returncode != 0:
        pytest.skip(f"objdump failed: {objdump.stderr[-200:]}")
    assert "prefetch" in objdump.stdout
