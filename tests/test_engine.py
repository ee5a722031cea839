"""The engine: continuous batching, chunked prefill, preemption, prefix caching, sampling, async front."""

from __future__ import annotations

import asyncio

import pytest
import torch
from checkpoints import VOCAB, add_tokenizer, build_hf_model, run_to_end

from selfseek import LLM, SamplingParams
from selfseek.engine import sampler
from selfseek.engine.async_engine import AsyncEngine
from selfseek.engine.engine import EngineArgs, LLMEngine
from selfseek.engine.errors import EngineDead, Overloaded, RequestError, RequestFailed
from selfseek.engine.sequence import Sequence
from selfseek.sampling_params import MAX_LOGIT_BIAS
from selfseek.weights.safetensors import load_checkpoint

MAX_NEW = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("v3_long")
    build_hf_model("v3_long").save_pretrained(path)
    add_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return load_checkpoint(folder, progress=False)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(model, **kw) -> LLMEngine:
    return LLMEngine(model, None, EngineArgs(**kw))


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
LENGTHS = [3, 17, 64, 65, 100, 130, 7, 33, 1, 90, 200, 12, 48, 75, 600, 5]  # 600 > the 128-token chunk


@pytest.fixture(scope="module")
def alone(model):
    """Each prompt run by itself, with no batching, no chunking, no cache sharing."""
    return {f"r{i}": run_to_end(_engine(model, enable_prefix_caching=False, max_num_batched_tokens=2048,
                                  kv_cache_memory=1 << 26), [_prompt(n, i)], GREEDY)["r0"]
            for i, n in enumerate(LENGTHS)}


def test_sixteen_concurrent_requests_equal_each_run_alone(model, alone):
    engine = _engine(model, max_num_batched_tokens=128, kv_cache_memory=1 << 26)
    got = run_to_end(engine, [_prompt(n, i) for i, n in enumerate(LENGTHS)], GREEDY)
    assert got == alone
    assert engine.blocks.num_free == engine.blocks.num_blocks  # every block back


def test_preemption_under_a_tiny_pool_loses_nothing(model, alone):
    bytes_per_block = 64 * model.config.num_hidden_layers * model.config.kv_values_per_token_per_layer * 4
    engine = _engine(model, max_num_batched_tokens=128, kv_cache_memory=14 * bytes_per_block)
    assert engine.blocks.num_blocks == 14
    got = run_to_end(engine, [_prompt(n, i) for i, n in enumerate(LENGTHS)], GREEDY)
    assert engine.scheduler.num_preemptions > 0
    assert got == alone
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_shared_prefix_is_served_from_the_cache(model):
    engine = _engine(model, kv_cache_memory=1 << 26)
    prefix = _prompt(1000, 100)
    run_to_end(engine, [prefix + _prompt(20, 101)], GREEDY)
    engine.add_request("b", prefix + _prompt(30, 102), GREEDY)
    deltas = engine.step()
    assert deltas[0].num_cached_tokens >= 960
    while engine.has_work():
        engine.step()
    stats = engine.stats()
    assert stats["prefix_cache_hit_tokens"] >= 960 and stats["kv_blocks_used"] == 0


def test_prefix_hits_give_the_same_tokens_as_a_cold_run(model):
    prefix = _prompt(300, 7)
    prompts = [prefix + _prompt(10, 8), prefix + _prompt(25, 9)]
    warm = _engine(model, kv_cache_memory=1 << 26)
    got = run_to_end(warm, prompts, GREEDY)
    cold = {k: run_to_end(_engine(model, enable_prefix_caching=False, kv_cache_memory=1 << 26), [p], GREEDY)["r0"]
            for k, p in zip(["r0", "r1"], prompts, strict=True)}
    assert got == cold


def test_abort_frees_blocks_at_once(model):
    engine = _engine(model, kv_cache_memory=1 << 26)
    start = engine.blocks.num_free
    engine.add_request("a", _prompt(300, 1), SamplingParams(max_tokens=100, ignore_eos=True))
    engine.add_request("b", _prompt(50, 2), SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.blocks.num_free < start
    deltas = engine.abort("a") + engine.abort("b")
    assert {d.finish_reason for d in deltas} == {"abort"}
    assert engine.blocks.num_free == start and not engine.has_work()


def test_seeded_sampling_reproduces_whatever_else_is_in_the_batch(model):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=MAX_NEW, seed=1234, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=MAX_NEW, ignore_eos=True)
    p = _prompt(20, 3)
    solo = run_to_end(_engine(model, kv_cache_memory=1 << 26), [p], seeded)["r0"]
    mixed = run_to_end(_engine(model, kv_cache_memory=1 << 26), [_prompt(40, 4), p, _prompt(9, 5)],
                       [other, seeded, other])
    assert mixed["r1"] == solo
    unseeded = run_to_end(_engine(model, kv_cache_memory=1 << 26), [p], other)["r0"]
    assert len(unseeded) == MAX_NEW


def test_top_k_one_equals_greedy(model):
    p = [_prompt(30, 11)]
    greedy = run_to_end(_engine(model, kv_cache_memory=1 << 26), p, GREEDY)
    top1 = run_to_end(_engine(model, kv_cache_memory=1 << 26), p,
                SamplingParams(temperature=0.8, top_k=1, max_tokens=MAX_NEW, ignore_eos=True))
    assert greedy == top1


def test_penalties_and_logit_bias_change_the_choice(model):
    p = [_prompt(30, 12)]
    base = run_to_end(_engine(model, kv_cache_memory=1 << 26), p, GREEDY)["r0"]
    banned = base[0]
    biased = run_to_end(_engine(model, kv_cache_memory=1 << 26), p, SamplingParams(
        temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logit_bias={banned: -100.0}))["r0"]
    assert banned not in biased
    rep = run_to_end(_engine(model, kv_cache_memory=1 << 26), p, SamplingParams(
        temperature=0, max_tokens=MAX_NEW, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0))["r0"]
    assert len(set(rep)) >= len(set(base))


def test_n_completions_share_the_prompt_blocks(model):
    engine = _engine(model, kv_cache_memory=1 << 26)
    params = SamplingParams(temperature=1.0, n=3, max_tokens=4, seed=5, ignore_eos=True)
    engine.add_request("x", _prompt(200, 13), params)
    cached, done = {}, 0
    while engine.has_work():
        for d in engine.step():
            cached[d.index] = d.num_cached_tokens
            done += d.finish_reason is not None
    assert done == 3
    assert cached[0] == 0 and cached[1] >= 192 and cached[2] >= 192


def test_stop_string_spanning_two_tokens_is_cut_exactly(folder):
    llm = LLM(folder, device="cpu", progress=False, kv_cache_memory=1 << 26)
    prompt = "The quick brown fox"
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    ids = free.token_ids
    pieces = [llm.tokenizer.decode(ids[:k]) for k in range(len(ids) + 1)]
    # a stop string made of the last character of token k and the first of token k + 1, found nowhere earlier
    def spans(k: int) -> bool:
        a, b = pieces[k], pieces[k + 1]
        if len(a) <= len(pieces[k - 1]) or len(b) <= len(a) or "\ufffd" in b or not b.startswith(a):
            return False
        return free.text.find(a[-1] + b[len(a)]) == len(a) - 1

    k = next(k for k in range(1, len(ids) - 1) if spans(k))
    stop = pieces[k][-1] + pieces[k + 1][len(pieces[k])]
    expected = free.text[: len(pieces[k]) - 1]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    c = out[0].outputs[0]
    assert c.text == expected and c.finish_reason == "stop" and c.stop_reason == stop
    streamed = "".join(llm.stream(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])))
    assert streamed == expected  # no partial stop string ever leaked


def test_kv_bytes_per_token_is_the_latent_size(model):
    engine = _engine(model, kv_cache_memory=1 << 26)
    cfg = model.config
    assert engine.stats()["kv_bytes_per_token"] == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


def test_async_engine_streams_and_aborts(model):
    async def main():
        engine = AsyncEngine(_engine(model, kv_cache_memory=1 << 26))
        try:
            total = engine.core.blocks.num_free
            greedy6 = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
            stream = engine.add_request("a", _prompt(40, 21), greedy6)
            tokens = [t async for d in stream for t in d.token_ids]
            assert len(tokens) == 6
            long = engine.add_request("b", _prompt(40, 22), SamplingParams(max_tokens=500, ignore_eos=True))
            async for _ in long:
                break  # the consumer leaves: the request is aborted, its blocks freed
            await long.aclose()
            for _ in range(100):
                await asyncio.sleep(0.05)
                if engine.stats()["kv_blocks_used"] == 0 and engine.core.blocks.num_free == total:
                    break
            assert engine.core.blocks.num_free == total
            with pytest.raises(ValueError):
                engine.add_request("c", [], SamplingParams())
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_kv_pool_sized_from_what_requests_need():
    from selfseek.engine.engine import kv_pool_blocks

    per_token = 46080  # SmolLM2-135M in fp32: 30 layers x K,V x 3 heads x 64 x 4 bytes
    free = 24 << 30
    # Default: one full-length context (8192 tokens = 128 blocks of 64), not 15% of free memory (2 GiB).
    assert kv_pool_blocks(EngineArgs(), per_token, 8192, free) == 128
    # Short contexts: two blocks per running sequence, but never more than max_num_seqs x max_model_len.
    assert kv_pool_blocks(EngineArgs(max_num_seqs=64), per_token, 1024, free) == 128
    assert kv_pool_blocks(EngineArgs(max_num_seqs=64), per_token, 64, free) == 64
    # The memory budget still bounds it: 0.15 x 1 GiB / (64 x 46080 B) = 54 blocks.
    assert kv_pool_blocks(EngineArgs(), per_token, 8192, 1 << 30) == int((1 << 30) * 0.15) // (64 * per_token)
    assert kv_pool_blocks(EngineArgs(kv_cache_max_default=10 * 64 * per_token), per_token, 8192, free) == 10
    # An explicit kv_cache_memory is honoured (beyond one context), capped at what can be used.
    assert kv_pool_blocks(EngineArgs(kv_cache_memory=1 << 30), per_token, 8192, None) == (1 << 30) // (64 * per_token)
    assert kv_pool_blocks(EngineArgs(kv_cache_memory=1 << 30, max_num_seqs=2), per_token, 640, None) == 20


def test_engine_pool_follows_the_sizing_rule(model):
    engine = LLMEngine(model, None, EngineArgs(max_model_len=256, max_num_seqs=4, block_size=16))
    assert engine.blocks.num_blocks == 256 // 16  # one 256-token context > 2 blocks x 4 sequences


# ---- sampler (no model) ----------------------------------------------------------------------------------
def _reference_filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    """The sort-based definition (the sampler before candidate sets): temperature, top-k, top-p, min-p."""
    temp = torch.tensor([p.temperature for p in params])[:, None]
    sorted_logits, order = (logits / temp).sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1])[None, :]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else logits.shape[-1] for p in params])
    sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([p.top_p for p in params])[:, None]
    probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    min_p = torch.tensor([p.min_p for p in params])[:, None]
    probs = probs.masked_fill(probs < min_p * probs[:, :1], 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(1, order, probs)


def _reference_penalties(row: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams) -> torch.Tensor:
    row = row.clone()
    if p.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(prompt + output)))
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and output:
        out = torch.tensor(output)
        counts = torch.zeros_like(row).scatter_add_(0, out, torch.ones_like(out, dtype=row.dtype))
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    for token, bias in p.logit_bias.items():
        row[token] += bias
    return row


def _fake(params: SamplingParams, prompt=(1, 2, 3), seed: int | None = None) -> Sequence:
    seq = Sequence("x", 0, list(prompt), params, 0, processors=list(params.logits_processors))
    if seed is not None:
        seq.generator = torch.Generator().manual_seed(seed)
    return seq


FILTERS = [dict(top_k=5), dict(top_k=50, top_p=0.8), dict(top_p=0.9), dict(top_p=0.5, min_p=0.02), dict(min_p=0.05),
           dict(top_k=2500, top_p=0.95), dict(top_k=10**9, top_p=0.7), dict(top_p=0.995, temperature=0.7),
           dict(min_p=0.9, temperature=2.0), dict(top_k=1500, min_p=0.01)]


@pytest.mark.parametrize("scale", [0.05, 1.0, 6.0])  # flat rows need more than the candidate set: the fallback
def test_candidate_filtering_equals_the_full_sort(scale):
    vocab = 3000  # more than sampler.CANDIDATES
    gen = torch.Generator().manual_seed(int(scale * 100))
    logits = torch.randn(len(FILTERS), vocab, generator=gen) * scale
    params = [SamplingParams(**f) for f in FILTERS]
    scaled = logits / torch.tensor([p.temperature for p in params])[:, None]
    probs, ids = sampler.filtered_probs(scaled, params)
    got = torch.zeros(len(params), vocab).scatter_add_(1, ids, probs)
    want = _reference_filtered_probs(logits, params)
    # equal up to fp32 summation order (logsumexp vs softmax): support and values
    assert ((got > 0) != (want > 0)).logical_and(torch.maximum(got, want) > 1e-7).sum() == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    if scale == 0.05:
        assert probs.shape[1] == vocab  # a near-uniform top-p row really took the whole-row path
    if scale == 6.0:
        assert probs.shape[1] < vocab  # peaked rows never sorted the whole vocabulary


def test_draws_follow_the_distribution():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(16) * 1.5, dim=0)
    probs[3] = 0.0
    probs /= probs.sum()
    n = 40_000
    seqs = [_fake(SamplingParams())] * n
    picks = torch.tensor(sampler._draw(probs.expand(n, -1).contiguous(), seqs))
    freq = torch.bincount(picks, minlength=16).float() / n
    assert freq[3] == 0
    assert (freq - probs).abs().max() < 0.01  # 4 sigma of the largest p at this n
    seeded = [_fake(SamplingParams(), seed=7) for _ in range(2)]
    rows = probs.expand(2, -1).contiguous()
    assert sampler._draw(rows, seeded)[0] == sampler._draw(rows[:1], [_fake(SamplingParams(), seed=7)])[0]


def test_wide_rows_draw_block_then_token():
    width = 5 * sampler.DRAW_BLOCK + 300  # a partial tail block; most blocks hold no mass at all
    probs = torch.zeros(width)
    support = [0, 1023, 1024, 2047, 3000, 5 * sampler.DRAW_BLOCK, width - 1]  # block edges and the tail
    probs[support] = torch.tensor([0.05, 0.1, 0.2, 0.15, 0.25, 0.13, 0.12])
    n = 8000
    torch.manual_seed(1)
    picks = sampler._draw(probs.expand(n, -1), [_fake(SamplingParams())] * n)
    freq = torch.bincount(torch.tensor(picks), minlength=width).float() / n
    assert set(picks) <= set(support)
    assert (freq - probs).abs().max() < 0.02  # about 4 sigma at this n


def test_incremental_penalties_equal_a_rebuild_each_step():
    vocab = 200
    p = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.7,
                       logit_bias={5: 3.0, 17: -2.0, 199: 1.5})
    seq = _fake(p, prompt=[4, 9, 9, 150])
    gen = torch.Generator().manual_seed(1)
    for token in [9, 5, 5, 33, 199, 4, 5]:
        logits = torch.randn(1, vocab, generator=gen) * 3
        work = logits.clone()
        sampler._apply_penalties(work[0], seq)
        sampler._apply_logit_bias(work, [seq], [0])
        want = _reference_penalties(logits[0], seq.prompt_ids, seq.output_ids, p)
        torch.testing.assert_close(work[0], want, rtol=0, atol=0)
        seq.output_ids.append(token)


def test_logit_bias_of_many_rows_is_one_op():
    vocab = 5000
    bias = {t: float(t % 7 - 3) for t in range(0, vocab, 5)}
    seqs = [_fake(SamplingParams(logit_bias=dict(list(bias.items())[: 1000 - 100 * i]))) for i in range(8)]
    logits = torch.randn(8, vocab)
    work = logits.clone()
    sampler._apply_logit_bias(work, seqs, list(range(8)))
    for i, s in enumerate(seqs):
        want = logits[i].clone()
        for t, b in s.params.logit_bias.items():
            want[t] += b
        torch.testing.assert_close(work[i], want, rtol=0, atol=0)


def test_one_rows_failure_does_not_touch_the_others():
    def boom(ids, row):
        raise RuntimeError("processor bug")

    def ban_all(ids, row):
        return torch.full_like(row, float("-inf"))

    seqs = [_fake(SamplingParams(temperature=0)), _fake(SamplingParams(logits_processors=[boom])),
            _fake(SamplingParams(temperature=0.8, top_p=0.9, seed=3), seed=3),
            _fake(SamplingParams(logits_processors=[ban_all])), _fake(SamplingParams(temperature=0, logprobs=2)),
            _fake(SamplingParams(logit_bias={10**6: 5.0})), _fake(SamplingParams(temperature=0, logit_bias={7: 80.0}))]
    logits = torch.randn(7, 300, generator=torch.Generator().manual_seed(2))
    logits[0, 42] = 50.0
    tokens, logprobs, failures = sampler.sample(logits, seqs)  # row 5's bias is past the vocabulary (unchecked)
    assert set(failures) == {1, 3, 5} and isinstance(failures[1], RuntimeError)
    assert tokens[6] == 7  # a bystander's bias still applies when another row's bias breaks the batched add
    assert tokens[1] is None and tokens[3] is None
    assert tokens[0] == 42 and tokens[4] == int(logits[4].argmax()) and 0 <= tokens[2] < 300
    assert tokens[4] in logprobs[4] and logprobs[1] is None


def test_sampling_parameter_limits_name_the_field():
    for field, value in [("seed", 2**64), ("seed", -(2**63) - 1), ("seed", 1.5), ("seed", True),
                         ("repetition_penalty", 1e-300), ("repetition_penalty", 1000.0),
                         ("logit_bias", {-1: 1.0}), ("logit_bias", {"5": 1.0}),
                         ("logit_bias", {i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}), ("temperature", float("inf")),
                         ("top_k", -2), ("stop_token_ids", [-3]), ("logits_processor_factories", [1])]:
        with pytest.raises(RequestError) as e:
            SamplingParams(**{field: value})
        assert e.value.param == field
    assert SamplingParams(seed=2**64 - 1).generator_seed(1) == 0  # wraps into what a generator accepts
    torch.Generator().manual_seed(SamplingParams(seed=-(2**63)).generator_seed(0))
    assert SamplingParams(temperature=1e-300).greedy and not SamplingParams(temperature=1e-3).greedy


# ---- fault isolation, typed errors, admission (with the model) -----------------------------------------
def _collect(engine: LLMEngine) -> tuple[dict[str, list[int]], dict[str, object]]:
    tokens, errors = {}, {}
    while engine.has_work():
        for d in engine.step():
            tokens.setdefault(d.request_id, []).extend(d.token_ids)
            if d.error is not None:
                errors[d.request_id] = d.error
    return tokens, errors


def test_a_raising_processor_fails_only_its_request(model):
    p = _prompt(30, 40)
    alone = run_to_end(_engine(model, kv_cache_memory=1 << 26), [p], GREEDY)["r0"]

    def explode_at_third(ids, row):
        if len(ids) == 2:
            raise RuntimeError("grammar bug")
        return row

    engine = _engine(model, kv_cache_memory=1 << 26)
    engine.add_request("ok", p, GREEDY)
    engine.add_request("bad", _prompt(20, 41), SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True,
                                                             logits_processors=[explode_at_third]))
    tokens, errors = _collect(engine)
    assert tokens["ok"] == alone and "ok" not in errors
    assert isinstance(errors["bad"], RequestFailed) and isinstance(errors["bad"].__cause__, RuntimeError)
    assert len(tokens["bad"]) == 2
    assert engine.blocks.num_free == engine.blocks.num_blocks and engine.stats()["requests_failed"] == 1


def test_a_forward_that_raises_for_one_request_fails_only_it(model, monkeypatch):
    p = _prompt(25, 42)
    alone = run_to_end(_engine(model, kv_cache_memory=1 << 26), [p], GREEDY)["r0"]
    engine = _engine(model, kv_cache_memory=1 << 26)
    real_run = engine.runner.run

    def run(scheduled):  # fault injection: this request's input breaks the batched forward at its 4th step
        if any(s.seq.request_id == "bad" and len(s.seq.output_ids) == 3 for s in scheduled):
            raise RuntimeError("kernel fault")
        return real_run(scheduled)

    monkeypatch.setattr(engine.runner, "run", run)
    engine.add_request("ok", p, GREEDY)
    engine.add_request("bad", _prompt(50, 43), GREEDY)
    tokens, errors = _collect(engine)
    assert tokens["ok"] == alone and set(errors) == {"bad"} and isinstance(errors["bad"], RequestFailed)
    assert len(tokens["bad"]) == 3 and engine.blocks.num_free == engine.blocks.num_blocks


def test_a_broken_model_is_reported_dead_not_as_request_failures(model, monkeypatch):
    engine = _engine(model, kv_cache_memory=1 << 26)

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "run", broken)
    engine.add_request("a", _prompt(10, 60), GREEDY)
    engine.add_request("b", _prompt(12, 61), GREEDY)
    tokens, errors = _collect(engine)  # the runner fails, the model itself still runs: inputs at fault
    assert set(errors) == {"a", "b"} and all(isinstance(e, RequestFailed) for e in errors.values())
    monkeypatch.setattr(engine.model, "forward", broken)
    engine.add_request("c", _prompt(10, 62), GREEDY)
    with pytest.raises(EngineDead):
        engine.step()


def test_n_completions_get_their_own_processors_from_factories(model):
    made = []

    class Counter:
        def __init__(self):
            self.calls = 0
            made.append(self)

        def __call__(self, ids, row):
            assert len(ids) == self.calls  # a processor sees exactly its own completion's tokens
            self.calls += 1
            return row

    engine = _engine(model, kv_cache_memory=1 << 26)
    params = SamplingParams(n=3, temperature=1.0, seed=9, max_tokens=5, ignore_eos=True,
                            logits_processor_factories=[Counter])
    engine.add_request("x", _prompt(20, 44), params)
    tokens, errors = _collect(engine)
    assert not errors and len(made) == 3 and [c.calls for c in made] == [5, 5, 5]


def test_a_request_that_can_never_fit_is_refused_alone(model):
    bytes_per_block = 16 * model.config.num_hidden_layers * model.config.kv_values_per_token_per_layer * 4
    engine = _engine(model, kv_cache_memory=2 * bytes_per_block, block_size=16)
    assert engine.blocks.num_blocks == 2
    engine.add_request("huge", _prompt(40, 45), GREEDY)  # 3 blocks: prepare() would refuse it, add_request does not
    deltas = engine.step()
    assert [d.finish_reason for d in deltas] == ["abort"] and isinstance(deltas[0].error, Overloaded)
    assert not engine.has_work() and engine.blocks.num_free == engine.blocks.num_blocks


def test_prepare_checks_parameters_against_the_vocabulary(model):
    engine = _engine(model, kv_cache_memory=1 << 26)
    for params, field in [(SamplingParams(logit_bias={VOCAB: 1.0}), "logit_bias"),
                          (SamplingParams(stop_token_ids=[VOCAB + 7]), "stop_token_ids")]:
        with pytest.raises(RequestError) as e:
            engine.prepare([1, 2, 3], params)
        assert e.value.param == field
    with pytest.raises(RequestError) as e:
        engine.prepare([VOCAB], GREEDY)
    assert e.value.param == "prompt"


def test_hostile_sampling_values_cannot_break_a_shared_batch(model):
    p = _prompt(30, 46)
    engine = _engine(model, kv_cache_memory=1 << 26)
    alone = run_to_end(engine, [p], GREEDY)["r0"]
    hostile = [SamplingParams(temperature=1e-300, max_tokens=MAX_NEW, ignore_eos=True),
               SamplingParams(top_k=10**30, temperature=1.0, max_tokens=MAX_NEW, ignore_eos=True),
               SamplingParams(repetition_penalty=0.01, temperature=0.7, top_p=0.5, max_tokens=MAX_NEW,
                              ignore_eos=True, logit_bias={i: 100.0 for i in range(VOCAB)}),
               SamplingParams(seed=2**64 - 1, n=2, temperature=1.0, max_tokens=MAX_NEW, ignore_eos=True)]
    got = run_to_end(engine, [p] + [_prompt(10 + i, 47 + i) for i in range(len(hostile))], [GREEDY] + hostile)
    assert got["r0"] == alone and all(len(t) == MAX_NEW * (2 if i == 4 else 1) for i, t in enumerate(got.values())
                                      if i)
    tiny = run_to_end(engine, [p], SamplingParams(temperature=1e-300, max_tokens=MAX_NEW, ignore_eos=True))["r0"]
    assert tiny == alone  # a temperature under the floor is greedy


def test_cache_salt_separates_tenants(model):
    engine = _engine(model, kv_cache_memory=1 << 26)
    p = _prompt(300, 48)

    def cached(salt):
        params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, cache_salt=salt)
        engine.add_request(f"r-{salt}-{engine.counters['prompt_tokens']}", p, params)
        first = engine.step()[0].num_cached_tokens
        _collect(engine)
        return first

    assert cached("alice") == 0
    assert cached("bob") == 0 and cached(None) == 0
    assert cached("alice") >= 256 and cached("bob") >= 256


def test_fingerprint_follows_the_weights(model, monkeypatch):
    from selfseek import kernels
    from selfseek.engine.engine import model_fingerprint

    before = model_fingerprint(model)
    assert model_fingerprint(model) == before
    monkeypatch.setattr(kernels, "INT8_ACTIVATIONS", not kernels.INT8_ACTIVATIONS)  # another KV for the same weights
    assert model_fingerprint(model) != before
    monkeypatch.undo()
    w = next(model.parameters())
    with torch.no_grad():
        w.view(-1)[0] += 1.0
        try:
            assert model_fingerprint(model) != before
        finally:
            w.view(-1)[0] -= 1.0


def _async(model, fn, **kw):
    async def main():
        engine = AsyncEngine(_engine(model, kv_cache_memory=1 << 26), **kw)
        try:
            await fn(engine)
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_async_add_time_error_fails_that_request_only(model):
    def broken_factory():
        raise RuntimeError("factory bug")

    async def fn(engine):
        params = SamplingParams(n=2, logits_processor_factories=[broken_factory])
        bad = engine.add_request("bad", _prompt(10, 50), params)
        ok = engine.add_request("ok", _prompt(10, 51), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        bad_deltas = [d async for d in bad]
        assert len(bad_deltas) == 2 and all(isinstance(d.error, RequestFailed) for d in bad_deltas)
        assert len([t async for d in ok for t in d.token_ids]) == 4
        assert engine.healthy

    _async(model, fn)


def test_a_dead_engine_fails_fast(model, monkeypatch):
    async def fn(engine):
        stream = engine.add_request("a", _prompt(10, 52), SamplingParams(max_tokens=1000, ignore_eos=True))
        first = await stream.__anext__()
        assert first.error is None

        def broken():
            raise SystemError("engine state corrupted")

        monkeypatch.setattr(engine.core, "has_work", broken)
        rest = [d async for d in stream]  # ends, with the error, instead of hanging
        assert rest[-1].finish_reason == "abort" and isinstance(rest[-1].error, EngineDead)
        assert not engine.healthy
        with pytest.raises(EngineDead):
            engine.add_request("b", _prompt(10, 53), GREEDY)

    _async(model, fn)


def test_admission_bound_and_unread_output_bound(model):
    async def fn(engine):
        total = engine.core.blocks.num_free
        slow = engine.add_request("slow", _prompt(10, 54), SamplingParams(max_tokens=400, ignore_eos=True))
        with pytest.raises(Overloaded):  # "slow" has produced nothing yet: the waiting queue (1) is full
            engine.add_request("next", _prompt(10, 55), GREEDY)
        for _ in range(400):  # nobody reads "slow": after 3 unread deltas it is aborted and its blocks freed
            await asyncio.sleep(0.05)
            if engine.stats()["kv_blocks_free"] == total and "slow" not in engine._subs:
                break
        got = [d async for d in slow]
        assert len(got) <= 4 and isinstance(got[-1].error, RequestFailed)
        assert engine.core.blocks.num_free == total

    _async(model, fn, max_queue=1, max_buffered_deltas=3)
