"""The attention backend: the block-table kernel (every ISA path) and its torch fallback against a dense
reference kept here, on shuffled block layouts, shared prefix blocks, chunked prefill and mixed batches; the
engine's persistent block tables; the fused MLA down-projections."""

from __future__ import annotations

import random

import pytest
import torch
from checkpoints import FAMILIES, VOCAB

from selfseek.config import ModelConfig
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
    """Work split across threads (query heads sliced for a single decode) changes nothing."""
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

def tiny_model(family: str, model_type: str) -> CausalLM:
    cfg = ModelConfig.from_dict(dict(FAMILIES[family][1], model_type=model_type, vocab_size=VOCAB))
    torch.manual_seed(0)
    model = CausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 if p.dim() > 1 else 1 + 0.1 * torch.randn_like(p))
    return model.eval()


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
