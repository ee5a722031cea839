"""The engine: continuous batching, chunked prefill, preemption, prefix caching, sampling, async front."""

from __future__ import annotations

import asyncio

import pytest
import torch
from checkpoints import VOCAB, add_tokenizer, build_hf_model

from selfseek import LLM, SamplingParams
from selfseek.engine.async_engine import AsyncEngine
from selfseek.engine.engine import EngineArgs, LLMEngine
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


def _run(engine: LLMEngine, prompts: list[list[int]], params) -> dict[str, list[int]]:
    params = params if isinstance(params, list) else [params] * len(prompts)
    out = {}
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{i}", engine.prepare(p, sp), sp)
        out[f"r{i}"] = []
    while engine.has_work():
        for d in engine.step():
            out[d.request_id] += d.token_ids
    return out


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
LENGTHS = [3, 17, 64, 65, 100, 130, 7, 33, 1, 90, 200, 12, 48, 75, 600, 5]  # 600 > the 128-token chunk


@pytest.fixture(scope="module")
def alone(model):
    """Each prompt run by itself, with no batching, no chunking, no cache sharing."""
    return {f"r{i}": _run(_engine(model, enable_prefix_caching=False, max_num_batched_tokens=2048,
                                  kv_cache_memory=1 << 26), [_prompt(n, i)], GREEDY)["r0"]
            for i, n in enumerate(LENGTHS)}


def test_sixteen_concurrent_requests_equal_each_run_alone(model, alone):
    engine = _engine(model, max_num_batched_tokens=128, kv_cache_memory=1 << 26)
    got = _run(engine, [_prompt(n, i) for i, n in enumerate(LENGTHS)], GREEDY)
    assert got == alone
    assert engine.blocks.num_free == engine.blocks.num_blocks  # every block back


def test_preemption_under_a_tiny_pool_loses_nothing(model, alone):
    bytes_per_block = 64 * model.config.num_hidden_layers * model.config.kv_values_per_token_per_layer * 4
    engine = _engine(model, max_num_batched_tokens=128, kv_cache_memory=14 * bytes_per_block)
    assert engine.blocks.num_blocks == 14
    got = _run(engine, [_prompt(n, i) for i, n in enumerate(LENGTHS)], GREEDY)
    assert engine.scheduler.num_preemptions > 0
    assert got == alone
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_shared_prefix_is_served_from_the_cache(model):
    engine = _engine(model, kv_cache_memory=1 << 26)
    prefix = _prompt(1000, 100)
    _run(engine, [prefix + _prompt(20, 101)], GREEDY)
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
    got = _run(warm, prompts, GREEDY)
    cold = {k: _run(_engine(model, enable_prefix_caching=False, kv_cache_memory=1 << 26), [p], GREEDY)["r0"]
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
    solo = _run(_engine(model, kv_cache_memory=1 << 26), [p], seeded)["r0"]
    mixed = _run(_engine(model, kv_cache_memory=1 << 26), [_prompt(40, 4), p, _prompt(9, 5)], [other, seeded, other])
    assert mixed["r1"] == solo
    unseeded = _run(_engine(model, kv_cache_memory=1 << 26), [p], other)["r0"]
    assert len(unseeded) == MAX_NEW


def test_top_k_one_equals_greedy(model):
    p = [_prompt(30, 11)]
    greedy = _run(_engine(model, kv_cache_memory=1 << 26), p, GREEDY)
    top1 = _run(_engine(model, kv_cache_memory=1 << 26), p,
                SamplingParams(temperature=0.8, top_k=1, max_tokens=MAX_NEW, ignore_eos=True))
    assert greedy == top1


def test_penalties_and_logit_bias_change_the_choice(model):
    p = [_prompt(30, 12)]
    base = _run(_engine(model, kv_cache_memory=1 << 26), p, GREEDY)["r0"]
    banned = base[0]
    biased = _run(_engine(model, kv_cache_memory=1 << 26), p, SamplingParams(
        temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logit_bias={banned: -100.0}))["r0"]
    assert banned not in biased
    rep = _run(_engine(model, kv_cache_memory=1 << 26), p, SamplingParams(
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
