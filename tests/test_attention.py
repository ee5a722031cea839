"""The attention backend: the block-table kernel (every ISA path) and its torch fallback against a dense
reference kept here, on shuffled block layouts, shared prefix blocks, chunked prefill and mixed batches; the
engine's persistent block tables; the fused MLA down-projections."""

from __future__ import annotations

import random
import types

import pytest
import torch
from checkpoints import VOCAB, tiny_model

from selfseek.engine.engine import _cache_dtype
from selfseek.engine.runner import BlockTables
from selfseek.engine.sequence import Sequence, Status
from selfseek.kernels import build
from selfseek.models import attention_backend
from selfseek.models.attention_backend import paged_attention
from selfseek.models.batch import PagedRows, batch_from_tables
from selfseek.models.layers import fused_rows
from selfseek.models.mla import MLA
from selfseek.models.model import CausalLM
from selfseek.models.quant import QuantLinear, quantize_model
from selfseek.sampling_params import SamplingParams

# avx512vnni compiles the same code as avx512 here (the kernel has no integer dot products)
BACKENDS = [f"kernel-{isa}" for isa in build.supported_isas() if isa != "avx512vnni"] + ["torch"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs the test on one kernel ISA path (SELFSEEK_ISA) or on the torch fallback (SELFSEEK_NO_KERNELS=1)."""
    if request.param == "torch":
        monkeypatch.setenv("SELFSEEK_NO_KERNELS", "1")
    else:
        monkeypatch.delenv("SELFSEEK_NO_KERNELS", raising=False)
        monkeypatch.setenv("SELFSEEK_ISA", request.param.removeprefix("kernel-"))
    build.library.cache_clear()
    is_kernel = attention_backend._kernel(torch.device("cpu")) is not None
    assert is_kernel == (request.param != "torch"), "the kernel library did not load"
    yield request.param
    build.library.cache_clear()


# ---- the dense reference --------------------------------------------------------------------------------

def reference_attention(q, k_cache, v_cache, tables, block_size, cu_q, context_lens, scale):
    """Plain per-row softmax attention in float64 over keys looked up one by one through the block tables."""
    out = []
    for i, n_ctx in enumerate(context_lens):
        slots = [tables[i][t // block_size] * block_size + t % block_size for t in range(n_ctx)]
        k, v = k_cache[slots].double(), v_cache[slots].double()  # [t, kv, d]
        n = cu_q[i + 1] - cu_q[i]
        for j in range(n):
            seen = n_ctx - n + j + 1
            scores = torch.einsum("kgd,tkd->kgt", q[cu_q[i] + j].double(), k[:seen]) * scale
            out.append(torch.einsum("kgt,tkd->kgd", scores.softmax(-1), v[:seen]))
    return torch.stack(out).float()


def random_layout(rng: random.Random, ctx_lens: list[int], block_size: int, share: int):
    """Block tables over a shuffled pool; sequence 1 shares sequence 0's first `share` blocks (a prefix hit)."""
    need = [-(-n // block_size) for n in ctx_lens]
    num_blocks = sum(need) + 7  # spare blocks: tables never cover the pool in order
    pool_blocks = list(range(num_blocks))
    rng.shuffle(pool_blocks)
    tables = []
    for i, nb in enumerate(need):
        own = share if i == 1 else 0
        tables.append((tables[0][:own] if own else []) + [pool_blocks.pop() for _ in range(nb - own)])
    width = max(need)
    return [t + [0] * (width - len(t)) for t in tables], num_blocks


LAYOUTS = {  # name -> (kv heads, query heads per kv head, key dim, value dim, value offset in the pool row)
    "gqa": (2, 3, 40, 40, None),
    "mla": (1, 5, 56, 48, 0),  # K = [latent 48; rope 8], V = the latent
    "mla_wide": (1, 4, 152, 136, 0),  # wide enough for the kernel's 4-vector accumulators
    "mla_heads": (1, 16, 56, 48, 0),  # V3's 16 heads: more than one group of heads per pass over V
}


def make_cache(name: str, num_slots: int, dtype: torch.dtype, gen: torch.Generator):
    n_kv, _, dk, dv, v_off = LAYOUTS[name]
    if v_off is None:  # GQA pool [slots, 2, kv, d]
        pool = torch.randn(num_slots, 2, n_kv, dk, generator=gen).to(dtype)
        return pool[:, 0], pool[:, 1]
    pool = torch.randn(num_slots, dk, generator=gen).to(dtype)  # MLA pool [slots, c + r]
    return pool[:, None], pool[:, None, v_off : v_off + dv]


def check(name, dtype, block_size, ctx_lens, num_new, share=0, seed=0):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    n_kv, g, dk, _, _ = LAYOUTS[name]
    tables, num_blocks = random_layout(rng, ctx_lens, block_size, share)
    k_cache, v_cache = make_cache(name, num_blocks * block_size, dtype, gen)
    cu = [0]
    for n in num_new:
        cu.append(cu[-1] + n)
    rows = PagedRows(0, torch.tensor(cu, dtype=torch.int32), torch.tensor(ctx_lens, dtype=torch.int32),
                     torch.tensor(tables, dtype=torch.int32), block_size, max(ctx_lens))
    q = torch.randn(sum(num_new), n_kv, g, dk, generator=gen)
    scale = dk**-0.5
    got = paged_attention(q, k_cache, v_cache, rows, scale)
    want = reference_attention(q, k_cache, v_cache, tables, block_size, cu, ctx_lens, scale)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- the kernel and the fallback against the reference -------------------------------------------------

@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decodes_on_shuffled_blocks(backend, name, dtype):
    check(name, dtype, block_size=4, ctx_lens=[2, 7, 33, 70, 16], num_new=[1] * 5)


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("block_size", [1, 64])
def test_mixed_batch_chunks_and_decodes_sharing_a_prefix(backend, name, block_size):
    """A chunk after a cached prefix, a second sequence sharing the first's prefix blocks, decodes."""
    check(name, torch.float32, block_size, ctx_lens=[90, 75, 40, 3], num_new=[26, 11, 1, 1],
          share=64 // block_size, seed=block_size)


def test_chunk_covering_the_whole_context(backend):
    """Every key is new (rows see 1..n keys): the causal limit inside the chunk itself."""
    check("mla", torch.float32, 4, ctx_lens=[9, 5], num_new=[9, 5])


def test_kernel_uses_several_threads_like_one(monkeypatch):
    """Work split across threads changes nothing: query heads sliced, and rows' keys cut into ranges whose softmax
    states are merged (fewer rows than threads and 128 keys or more; a short row's later ranges are empty)."""
    monkeypatch.delenv("SELFSEEK_NO_KERNELS", raising=False)
    monkeypatch.delenv("SELFSEEK_ISA", raising=False)
    build.library.cache_clear()
    assert attention_backend._kernel(torch.device("cpu")) is not None
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 7):
            torch.set_num_threads(threads)
            check("mla_wide", torch.float32, 4, ctx_lens=[50], num_new=[1], seed=3)
            check("gqa", torch.float32, 4, ctx_lens=[50, 9], num_new=[3, 1], seed=4)
            check("mla_wide", torch.float32, 16, ctx_lens=[200], num_new=[1], seed=5)
            check("gqa", torch.float32, 4, ctx_lens=[300, 20], num_new=[1, 1], seed=6)
            check("gqa", torch.float32, 16, ctx_lens=[150, 130], num_new=[2, 1], seed=7)
    finally:
        torch.set_num_threads(before)


def test_rejects_caches_that_do_not_fit_the_queries():
    batch = batch_from_tables(torch.zeros(1, 1, dtype=torch.int32), [0], [1], [1], 4)
    pool = torch.zeros(8, 2, 2, 16)
    with pytest.raises(ValueError, match="do not fit"):
        paged_attention(torch.zeros(1, 2, 3, 8), pool[:, 0], pool[:, 1], batch.paged, 1.0)
    narrow = PagedRows(0, batch.paged.cu_q, torch.tensor([9], dtype=torch.int32), batch.paged.block_tables, 4, 9)
    with pytest.raises(ValueError, match="cannot hold max_context 9"):
        paged_attention(torch.zeros(1, 2, 3, 16), pool[:, 0], pool[:, 1], narrow, 1.0)


# ---- the model over the engine's batches ---------------------------------------------------------------

@pytest.mark.parametrize("family,model_type", [("v3_noaux", "deepseek_v3"), ("llama_linear", "llama")])
def test_engine_steps_equal_whole_sequences(backend, family, model_type):
    """Chunked prefill, a prefix shared through block tables, decodes and a new prompt in one mixed step give
    the hidden states of each whole sequence run without a cache."""
    model = tiny_model(family, model_type)
    bs = 4
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, VOCAB, (21,), generator=gen)
    b = torch.cat([a[:8], torch.randint(0, VOCAB, (7,), generator=gen)])  # shares a's first two blocks
    c = torch.randint(0, VOCAB, (10,), generator=gen)
    d = torch.randint(0, VOCAB, (5,), generator=gen)
    e = torch.randint(0, VOCAB, (6 + MLA.EXPANDED_MIN_ROWS,), generator=gen)  # a long chunk: MLA attends expanded
    blocks = list(range(64))
    random.Random(0).shuffle(blocks)
    ta = blocks[:6]
    tables = torch.zeros(5, 20, dtype=torch.int32)
    for row, t in enumerate([ta, ta[:2] + blocks[6:8], blocks[8:11], blocks[11:13], blocks[13:13 + 18]]):
        tables[row, : len(t)] = torch.tensor(t)
    pools = model.new_kv_pools(64 * bs)
    with torch.no_grad():
        want = {k: model.hidden_states(s[None])[0] for k, s in dict(a=a, b=b, c=c, d=d, e=e).items()}
        # step 1: dense prefills of a's first 10 tokens, c's first 9 and e's first 6
        step1 = batch_from_tables(tables, [0, 2, 4], [0, 0, 0], [10, 9, 6], bs)
        h1 = model.hidden_states(torch.cat([a[:10], c[:9], e[:6]]), step1, pools)
        # step 2: d's whole prompt (dense); e's and a's chunks after their prefixes, b after the shared prefix,
        # c's decode (cached context, longest chunk first)
        step2 = batch_from_tables(tables, [3, 4, 0, 1, 2], [0, 6, 10, 8, 9], [5, len(e) - 6, 11, 7, 1], bs)
        h2 = model.hidden_states(torch.cat([d, e[6:], a[10:], b[8:], c[9:]]), step2, pools)
    h2 = dict(zip("deabc", h2.split([5, len(e) - 6, 11, 7, 1]), strict=True))
    got = dict(a=torch.cat([h1[:10], h2["a"]]), b=h2["b"], c=torch.cat([h1[10:19], h2["c"]]), d=h2["d"],
               e=torch.cat([h1[19:], h2["e"]]))
    for k in got:
        torch.testing.assert_close(got[k], want[k][-len(got[k]) :], rtol=1e-5, atol=1e-5, msg=k)


# ---- persistent block tables ---------------------------------------------------------------------------

def _seq(i: int) -> Sequence:
    return Sequence(f"r{i}", 0, [1, 2, 3], SamplingParams(), i)


def test_block_tables_copy_only_new_blocks_and_follow_preemption():
    tables = BlockTables(rows=2, cols=2)
    s0, s1, s2 = _seq(0), _seq(1), _seq(2)
    s0.block_table, s1.block_table = [5, 9], [3]
    rows = tables.sync([s0, s1])
    assert tables.table[rows[0], :2].tolist() == [5, 9] and tables.table[rows[1], 0] == 3
    s0.block_table.extend([11, 12, 13])  # grows past the columns
    tables.table[rows[0], 0] = -1  # a copied block is never copied again...
    assert tables.sync([s0]) == [rows[0]]
    assert tables.table[rows[0], :5].tolist() == [-1, 9, 11, 12, 13]
    s0.block_table = [7]  # ...until the manager replaces the list (preemption, then re-allocation)
    tables.sync([s0])
    assert tables.table[rows[0], 0] == 7
    s0.block_table.clear()  # the same list emptied and refilled by a preemption
    s0.block_table.append(6)
    s0.num_preemptions += 1
    tables.sync([s0])
    assert tables.table[rows[0], 0] == 6
    s2.block_table = [4, 4]
    r2 = tables.sync([s2])[0]  # grows past the rows
    assert r2 not in rows and tables.table.shape[0] >= 3
    s1.status = Status.FINISHED
    s3 = _seq(3)
    s3.block_table = [8]
    assert tables.sync([s3]) == [rows[1]]  # the finished sequence's row is reused


# ---- fused q_a / kv_a projections --------------------------------------------------------------------

@pytest.mark.parametrize("bits", [None, 8])
def test_fused_down_projections_equal_separate_ones(bits):
    model = tiny_model("v3_noaux", "deepseek_v3")
    if bits:
        quantize_model(model, bits)
    attn = model.model.layers[0].self_attn
    names = sorted(model.state_dict())
    x = torch.randn(5, model.config.hidden_size)
    with torch.no_grad():
        want = (attn.q_a_proj(x), attn.kv_a_proj_with_mqa(x))
        got = attn._down_projections(x)
        fused = attn._fused_down()
    assert fused is not None and isinstance(fused, QuantLinear) == bool(bits)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    assert sorted(model.state_dict()) == names  # loading and export still see the two layers
    weight = "qweight" if bits else "weight"
    assert getattr(attn.q_a_proj, weight).data_ptr() == getattr(fused, weight).data_ptr()  # views, no copy


def test_projections_are_not_fused_while_training():
    model = tiny_model("v3_noaux", "deepseek_v3").train()
    attn = model.model.layers[0].self_attn
    assert attn._fused_down() is None
    attn._down_projections(torch.randn(3, model.config.hidden_size))[0].sum().backward()
    assert attn.q_a_proj.weight.grad is not None


# ---- fused q/k/v and gate/up projections (Llama / Qwen-shaped layers) ------------------------------------

@pytest.mark.parametrize("family,model_type,bits", [("llama_linear", "llama", None), ("llama_linear", "llama", 4),
                                                    ("qwen2", "qwen2", None)])
def test_fused_qkv_and_gate_up_equal_separate_layers(family, model_type, bits):
    model = tiny_model(family, model_type)
    if bits:
        quantize_model(model, bits)
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    names = sorted(model.state_dict())
    x = torch.randn(5, model.config.hidden_size)
    with torch.no_grad():
        want_qkv = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
        want_mlp = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        got_mlp = mlp(x)  # fuses gate/up
        fused = fused_rows(attn, (attn.q_proj, attn.k_proj, attn.v_proj))
        got_qkv = fused(x)
    assert isinstance(fused, QuantLinear) == bool(bits)
    if not bits:
        assert (fused.bias is not None) == (family == "qwen2")  # qwen2's q/k/v biases are fused too
    torch.testing.assert_close(got_qkv, want_qkv, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_mlp, want_mlp, rtol=1e-6, atol=1e-6)
    assert sorted(model.state_dict()) == names  # loading and export still see the separate layers
    weight = "qweight" if bits else "weight"
    assert getattr(attn.q_proj, weight).data_ptr() == getattr(fused, weight).data_ptr()  # views, no copy
    # Replacing a part's weight (here a new tensor) makes a new fused layer from the current weights.
    with torch.no_grad():
        if bits:
            attn.k_proj.set_from_float(torch.randn(attn.k_proj.out_features, attn.k_proj.in_features))
            attn.k_proj.qweight = attn.k_proj.qweight.clone()
        else:
            attn.k_proj.weight = torch.nn.Parameter(torch.randn_like(attn.k_proj.weight))
        refused = fused_rows(attn, (attn.q_proj, attn.k_proj, attn.v_proj))
        torch.testing.assert_close(refused(x)[:, attn.q_proj.out_features:][:, :attn.k_proj.out_features],
                                   attn.k_proj(x), rtol=1e-6, atol=1e-6)
    assert refused is not fused


def test_qkv_is_not_fused_while_training():
    model = tiny_model("llama_linear", "llama").train()
    attn = model.model.layers[0].self_attn
    assert fused_rows(attn, (attn.q_proj, attn.k_proj, attn.v_proj)) is None
    model.model.layers[0].mlp(torch.randn(3, model.config.hidden_size)).sum().backward()
    assert model.model.layers[0].mlp.gate_proj.weight.grad is not None


# ---- the fp8 latent cache ------------------------------------------------------------------------------

def decode_e4m3(bytes_: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn bytes -> float64 by the format's definition (sign, 4 exponent bits with bias 7, 3 mantissa
    bits, subnormals at exponent 0; S.1111.111 is NaN), independent of torch's float8 dtype."""
    b = bytes_.long()
    sign = 1 - 2 * ((b >> 7) & 1).double()
    exp, man = (b >> 3) & 0xF, (b & 7).double()
    value = torch.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * torch.pow(2.0, exp.double() - 7))
    return torch.where((exp == 15) & (man == 7), torch.nan, sign * value)


def reference_fp8_dequantize(rows: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 rows -> float64 [n, width]: the values after 4-aligned padding come as one fp32 scale per 64."""
    tiles = -(-width // 64)
    offset = -(-width // 4) * 4
    scales = rows[:, offset : offset + 4 * tiles].contiguous().view(torch.float32).double()
    return decode_e4m3(rows[:, :width]) * scales.repeat_interleave(64, dim=1)[:, :width]


@pytest.mark.parametrize("width", [56, 576, 150])
def test_fp8_rows_round_trip_within_the_format_precision(width):
    """Each tile's largest value maps to 448; every value comes back within e4m3's half-ulp (2^-4 relative,
    2^-10 x scale absolute in the subnormal range); an all-zero tile stays zero."""
    x = torch.randn(37, width, generator=torch.Generator().manual_seed(width)) * torch.logspace(-3, 2, 37)[:, None]
    x[3] = 0
    rows = attention_backend.quantize_fp8(x)
    assert rows.dtype == torch.uint8 and rows.shape == (37, attention_backend.fp8_row_bytes(width))
    back = reference_fp8_dequantize(rows, width)
    assert torch.equal(attention_backend.dequantize_fp8(rows, width), back.float())  # one fp32 rounding each
    tile_max = torch.nn.functional.pad(x.abs(), (0, -width % 64)).view(37, -1, 64).amax(-1).double()
    scale = (tile_max / 448).repeat_interleave(64, dim=1)[:, :width]
    assert ((back - x.double()).abs() <= torch.maximum(x.abs().double() * 2.0**-4, scale * 2.0**-10) * 1.001).all()
    assert (back[3] == 0).all()
    fp8_max = torch.nn.functional.pad(decode_e4m3(rows[:, :width]).abs(), (0, -width % 64)).view(37, -1, 64)
    assert (fp8_max.amax(-1)[torch.arange(37) != 3] == 448).all()  # each tile's largest value at the top


def test_kernel_fp8_dequantize_equals_the_format_on_every_byte(backend):
    """The kernel's fp8 -> fp32 conversion (vectorized by bit manipulation on AVX2/AVX-512, a table on the
    generic path) gives every one of the 256 bytes exactly: normals, subnormals, both zeros, NaN; a scale per
    64 values, a ragged tail off the vector width."""
    if backend == "torch":
        pytest.skip("the kernel's conversion (the torch path is dequantize_fp8, tested above)")
    lib = attention_backend._kernel(torch.device("cpu"))
    src = torch.cat([torch.arange(256), torch.arange(255, -1, -1), torch.arange(0, 256, 7)]).to(torch.uint8)
    n = src.numel()
    scales = torch.tensor([1.0, 2.0**-20, 3.7, 1e3, 2.0**30, -0.5, 1e-30, 7.0, 1.0])[: -(-n // 64)].contiguous()
    dst = torch.empty(n)
    lib.selfseek_fp8_dequantize(src.data_ptr(), scales.data_ptr(), 64, n, dst.data_ptr())
    want = (decode_e4m3(src).float() * scales.repeat_interleave(64)[:n])  # exact value, one fp32 rounding
    nan = decode_e4m3(src).isnan()
    assert torch.equal(dst.isnan(), nan) and nan.sum() == 4  # 0x7f and 0xff, in each of the two full sweeps
    assert torch.equal(dst[~nan], want[~nan])
    assert torch.equal(dst[~nan].signbit(), want[~nan].signbit())  # -0 stays -0


def fp8_batch(name: str, seed: int):
    """A paged batch over a random fp8 pool of layout `name`: decodes, a chunk after a prefix, a shared prefix.
    -> (q, K, V, fp8 scales, dequantized K [slots, kv, dk], V [slots, kv, dv], rows, tables, cu, ctx_lens)."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    n_kv, g, dk, dv, v_off = LAYOUTS[name]
    ctx_lens, num_new = [90, 75, 40, 3], [26, 11, 1, 1]
    tables, num_blocks = random_layout(rng, ctx_lens, 16, share=4)
    slots = num_blocks * 16
    if v_off is None:  # GQA [slots, 2, kv, row bytes]: each head's K and V a row of its own
        pool = attention_backend.quantize_fp8(torch.randn(slots * 2 * n_kv, dk, generator=gen) * 3)
        dense = reference_fp8_dequantize(pool, dk).float().view(slots, 2, n_kv, dk)
        pool = pool.view(slots, 2, n_kv, -1)
        sc = attention_backend.fp8_scales(pool, dk)
        views = pool[:, 0, :, :dk], pool[:, 1, :, :dk], (sc[:, 0], sc[:, 1])
        dense_k, dense_v = dense[:, 0], dense[:, 1]
    else:  # MLA: K and V read the same row
        pool = attention_backend.quantize_fp8(torch.randn(slots, dk, generator=gen) * 3)
        sc = attention_backend.fp8_scales(pool, dk)[:, None]
        views = pool[:, None, :dk], pool[:, None, :dv], (sc, sc)
        dense = reference_fp8_dequantize(pool, dk).float()
        dense_k, dense_v = dense[:, None], dense[:, None, :dv]
    cu = [0]
    for n in num_new:
        cu.append(cu[-1] + n)
    rows = PagedRows(0, torch.tensor(cu, dtype=torch.int32), torch.tensor(ctx_lens, dtype=torch.int32),
                     torch.tensor(tables, dtype=torch.int32), 16, max(ctx_lens))
    q = torch.randn(sum(num_new), n_kv, g, dk, generator=gen)
    return q, *views, dense_k, dense_v, rows, tables, cu, ctx_lens


@pytest.mark.parametrize("name", ["gqa", "mla", "mla_wide"])
def test_fp8_cache_attention_equals_the_reference_over_dequantized_keys(backend, name):
    """Paged attention over an fp8 pool (kernel: dequantized per tile as it reads; torch: the gathered rows)
    equals the float64 reference over the dequantized cache: decodes, a chunk after a prefix, a shared prefix.
    GQA: several KV heads, K and V with scales of their own."""
    q, k, v, scales, dense_k, dense_v, rows, tables, cu, ctx_lens = fp8_batch(name, 5)
    dk = q.shape[-1]
    got = paged_attention(q, k, v, rows, dk**-0.5, scales)
    want = reference_attention(q, dense_k, dense_v, tables, 16, cu, ctx_lens, dk**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fp8_scales_that_do_not_fit_are_rejected():
    q, k, v, (ks, vs), *_, rows, _, _, _ = fp8_batch("gqa", 6)
    with pytest.raises(ValueError, match="fp8_scales: the V scales"):
        paged_attention(q, k, v, rows, 1.0, (ks, vs[:, :1]))
    with pytest.raises(ValueError, match="an fp8 cache needs uint8 K/V views"):
        paged_attention(q, k.view(torch.float8_e4m3fn), v, rows, 1.0, (ks, vs))


def test_fp8_cache_in_the_model_absorbed_equals_expanded():
    """A V3 model on fp8 pools: the absorbed kernel path and the expanded path (dequantized in torch) read the
    same quantized latents and agree. The same steps on fp32 pools give the whole-sequence run, so the fp8
    runs' difference from it is the quantization alone (its size is measured, not asserted here)."""
    model = tiny_model("v3_noaux", "deepseek_v3")
    bs, gen = 4, torch.Generator().manual_seed(2)
    a, c = torch.randint(0, VOCAB, (21,), generator=gen), torch.randint(0, VOCAB, (10,), generator=gen)
    tables = torch.tensor([[5, 1, 7, 3, 0, 9], [2, 8, 4, 0, 0, 0]], dtype=torch.int32)
    out = {}
    with torch.no_grad():
        want = torch.cat([model.hidden_states(a[None])[0, 10:], model.hidden_states(c[None])[0, 9:]])
        for mode, dtype in (("absorbed", torch.float8_e4m3fn), ("expanded", torch.float8_e4m3fn),
                            ("fp32", torch.float32)):
            pools = model.new_kv_pools(16 * bs, dtype)
            assert all(p.dtype == (torch.uint8 if dtype != torch.float32 else dtype) for p in pools)
            model.hidden_states(torch.cat([a[:10], c[:9]]), batch_from_tables(tables, [0, 1], [0, 0], [10, 9], bs),
                                pools)
            step2 = batch_from_tables(tables, [0, 1], [10, 9], [11, 1], bs,
                                      decode_mode="expanded" if mode == "expanded" else "absorbed")
            out[mode] = model.hidden_states(torch.cat([a[10:], c[9:]]), step2, pools)
    torch.testing.assert_close(out["absorbed"], out["expanded"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["fp32"], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out["absorbed"], want, rtol=1e-3, atol=1e-3)  # the fp8 cache was really used


def test_engine_kv_cache_dtype_option():
    """`kv_cache_dtype="fp8"`: uint8 pools of fp8 rows, sized by their bytes (a quarter of fp32 plus the
    scales); unknown names are errors naming the field."""
    from selfseek.engine.engine import EngineArgs, LLMEngine

    model = tiny_model("v3_noaux", "deepseek_v3")
    cfg = model.config
    engine = LLMEngine(model, None, EngineArgs(kv_cache_memory=1 << 22, block_size=16, kv_cache_dtype="fp8"))
    row = attention_backend.fp8_row_bytes(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert engine.kv_bytes_per_token == cfg.num_hidden_layers * row
    assert all(p.dtype == torch.uint8 and p.shape[1] == row for p in engine.runner.pools)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    engine.add_request("r", list(range(2, 40)), params)
    out = []
    while engine.has_work():
        out += [t for d in engine.step() for t in d.token_ids]
    assert len(out) == 5 and engine.blocks.num_free == engine.blocks.num_blocks
    with pytest.raises(ValueError, match="kv_cache_dtype must be 'auto', 'float16', 'bfloat16' or 'fp8'"):
        LLMEngine(model, None, EngineArgs(kv_cache_memory=1 << 22, kv_cache_dtype="int4"))


def test_fp8_gqa_cache_gathered_chunk_equals_the_paged_kernel(monkeypatch):
    """A long chunk after a cached prefix on fp8 GQA pools: attended through the gathered, dequantized context
    (SDPA) or through the paged kernel (dequantized per tile), the model's hidden states agree."""
    from selfseek.models.attention import Attention

    model = tiny_model("llama_linear", "llama")
    bs, gen = 4, torch.Generator().manual_seed(3)
    a = torch.randint(0, VOCAB, (30,), generator=gen)
    tables = torch.tensor([[5, 1, 7, 3, 0, 9, 2, 8]], dtype=torch.int32)
    out = {}
    with torch.no_grad():
        for mode, min_rows in (("gathered", 4), ("kernel", 1 << 20)):
            monkeypatch.setattr(Attention, "GATHER_MIN_ROWS", min_rows)
            pools = model.new_kv_pools(16 * bs, torch.float8_e4m3fn)
            model.hidden_states(a[:10], batch_from_tables(tables, [0], [0], [10], bs), pools)
            out[mode] = model.hidden_states(a[10:], batch_from_tables(tables, [0], [10], [20], bs), pools)
    torch.testing.assert_close(out["gathered"], out["kernel"], rtol=1e-4, atol=1e-4)


def greedy_on_pools(model: CausalLM, prompt: list[int], n: int, dtype: torch.dtype) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of one sequence stepped by hand over pools of `dtype` (a prefill, then n - 1 decodes through
    the paged cache), and the logits of its last step."""
    bs = 16
    tables = torch.arange(8, dtype=torch.int32)[None]
    pools = model.new_kv_pools(8 * bs, dtype)
    toks, pos, new = [], 0, list(prompt)
    with torch.no_grad():
        for _ in range(n):
            h = model.hidden_states(torch.tensor(new), batch_from_tables(tables, [0], [pos], [len(new)], bs), pools)
            logits = model.logits(h[-1:])[0]
            pos += len(new)
            new = [int(logits.argmax())]
            toks += new
    return toks, logits


def test_engine_fp8_cache_on_a_gqa_model_decodes_greedily():
    """A Llama-shaped (GQA) model with `kv_cache_dtype="fp8"`: [slots, 2, kv, row bytes] uint8 pools sized by
    their bytes; the engine's greedy tokens equal the same steps by hand over fp8 pools, whose last logits
    differ from the fp32 cache's (the fp8 cache was really read), and DeepSeek-V4 is refused by name."""
    from selfseek.engine.engine import EngineArgs, LLMEngine

    model = tiny_model("llama_linear", "llama")
    cfg = model.config
    engine = LLMEngine(model, None, EngineArgs(kv_cache_memory=1 << 22, block_size=16, kv_cache_dtype="fp8"))
    row = attention_backend.fp8_row_bytes(cfg.head_dim)
    assert engine.kv_bytes_per_token == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * row
    assert all(p.dtype == torch.uint8 and p.shape[1:] == (2, cfg.num_key_value_heads, row)
               for p in engine.runner.pools)
    prompt = list(range(2, 40))
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    out = []
    while engine.has_work():
        out += [t for d in engine.step() for t in d.token_ids]
    want, fp8_logits = greedy_on_pools(model, prompt, 8, torch.float8_e4m3fn)
    assert out == want and engine.blocks.num_free == engine.blocks.num_blocks
    _, fp32_logits = greedy_on_pools(model, prompt, 8, torch.float32)
    assert not torch.allclose(fp8_logits, fp32_logits, rtol=1e-5, atol=1e-5)
    v4 = types.SimpleNamespace(config=types.SimpleNamespace(model_type="deepseek_v4", is_mla=False))
    with pytest.raises(ValueError, match="kv_cache_dtype fp8: not for DeepSeek-V4"):
        _cache_dtype("fp8", v4)


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
@pytest.mark.parametrize("family,model_type", [("llama_linear", "llama"), ("v3_noaux", "deepseek_v3")])
def test_engine_16_bit_cache_decodes_greedily(name, family, model_type):
    """`kv_cache_dtype="float16"` / `"bfloat16"` on an fp32 model: pools of that dtype at half the fp32 cache's
    bytes per token; the engine's greedy tokens equal the same steps by hand over such pools, whose last logits
    differ from the fp32 cache's (the 16-bit rows were really read) by rounding only; V3.2 and V4 are refused."""
    from selfseek.engine.engine import EngineArgs, LLMEngine

    model = tiny_model(family, model_type)
    dtype = getattr(torch, name)
    fp32 = LLMEngine(model, None, EngineArgs(kv_cache_memory=1 << 22, block_size=16))
    engine = LLMEngine(model, None, EngineArgs(kv_cache_memory=1 << 22, block_size=16, kv_cache_dtype=name))
    assert 2 * engine.kv_bytes_per_token == fp32.kv_bytes_per_token
    assert all(p.dtype == dtype for p in engine.runner.pools)
    prompt = list(range(2, 40))
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    out = []
    while engine.has_work():
        out += [t for d in engine.step() for t in d.token_ids]
    want, half_logits = greedy_on_pools(model, prompt, 8, dtype)
    assert out == want and engine.blocks.num_free == engine.blocks.num_blocks
    _, fp32_logits = greedy_on_pools(model, prompt, 8, torch.float32)
    assert not torch.equal(half_logits, fp32_logits)
    torch.testing.assert_close(half_logits, fp32_logits, rtol=0, atol=0.02)  # measured: 5e-4 fp16, 6e-3 bf16
    for model_type in ("deepseek_v4", "deepseek_v32"):
        other = types.SimpleNamespace(config=types.SimpleNamespace(model_type=model_type,
                                                                   has_indexer=model_type == "deepseek_v32"))
        with pytest.raises(ValueError, match=f"kv_cache_dtype {name}: not for DeepSeek-V4 or V3.2"):
            _cache_dtype(name, other)
