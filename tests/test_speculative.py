"""Speculative decoding with the MTP module (engine/speculative.py): the same tokens as without it, under
continuous batching, chunked prefill and prefix caching; drafts equal to the MTP module run without a cache."""

from __future__ import annotations

import pytest
import torch
from checkpoints import VOCAB, add_tokenizer, build_hf_model, run_to_end
from safetensors.torch import load_file, save_file

from selfseek import LLM, SamplingParams
from selfseek.engine.engine import EngineArgs, LLMEngine
from selfseek.engine.speculative import SpeculativeRunner
from selfseek.weights.safetensors import load_checkpoint

MAX_NEW = 10


def _with_mtp(folder, out, seed: int):
    """The checkpoint in `folder` plus a random MTP layer (transformers drops it when saving)."""
    state = load_file(folder / "model.safetensors")
    cfg = (folder / "config.json").read_text()
    n = build_hf_model.__globals__["FAMILIES"]["v3_long"][1]["num_hidden_layers"]
    g = torch.Generator().manual_seed(1000 + seed)
    for name in [k for k in state if k.startswith(f"model.layers.{n - 1}.")]:
        t = state[name]
        new = (1.0 + 0.1 * torch.randn(t.shape, generator=g) if name.endswith("norm.weight")
               else torch.randn(t.shape, generator=g) * 0.08)
        state[name.replace(f"layers.{n - 1}.", f"layers.{n}.")] = new
    mtp, h = f"model.layers.{n}.", state["lm_head.weight"].shape[1]
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        state[mtp + norm + ".weight"] = 1.0 + 0.1 * torch.randn(h, generator=g)
    state[mtp + "eh_proj.weight"] = torch.randn(h, 2 * h, generator=g) * 0.08
    state[mtp + "shared_head.head.weight"] = state["lm_head.weight"].clone()
    state[mtp + "embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    out.mkdir()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(cfg)
    return out


@pytest.fixture(scope="module", params=[0, 1])
def folder(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"v3_long_{request.param}")
    build_hf_model("v3_long", seed=request.param).save_pretrained(base)
    out = _with_mtp(base, base / "mtp", request.param)
    add_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def model(folder):
    m = load_checkpoint(folder, progress=False)
    assert len(m.mtp) == 1
    return m


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(model, **kw) -> LLMEngine:
    return LLMEngine(model, None, EngineArgs(kv_cache_memory=1 << 25, block_size=16, **kw))


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
PREFIX = _prompt(40, 99)  # shared by some prompts: prefix-cache hits
PROMPTS = [_prompt(5, 1), PREFIX + _prompt(7, 2), _prompt(150, 3), PREFIX + _prompt(20, 4), _prompt(1, 5),
           _prompt(33, 6)]


def _oracle(engine: LLMEngine, reference: dict[str, list[int]], right: callable) -> list[tuple[int, int]]:
    """Replace each MTP draft with the true next token (right(seq) true) or a wrong one; -> (right, wrong) counts
    of the drafts made. Exercises acceptance, which random MTP weights rarely reach."""
    runner, made = engine.speculative, []
    propose = runner.propose

    def patched():
        propose()
        for seq, (at, _) in runner.drafts.items():
            ref = reference[seq.request_id]
            k = len(seq.output_ids)
            if k < len(ref):
                ok = right(seq)
                runner.drafts[seq] = (at, [ref[k] if ok else (ref[k] + 1) % VOCAB])
                made.append(ok)

    runner.propose = patched
    return made


@pytest.mark.parametrize("batch", [[0], [0, 1, 2], [0, 1, 2, 3, 4, 5]])
def test_greedy_tokens_equal_without_speculation(model, batch):
    prompts, params = [PROMPTS[i] for i in batch], [GREEDY] * len(batch)
    want = run_to_end(_engine(model, max_num_batched_tokens=64), prompts, params)
    engine = _engine(model, max_num_batched_tokens=64, speculative_tokens=1)
    assert run_to_end(engine, prompts, params) == want
    stats = engine.stats()
    assert stats["spec_verify_steps"] > 0 and stats["spec_draft_tokens"] == stats["spec_verify_steps"]
    assert engine.blocks.num_free == engine.blocks.num_blocks  # every block back, draft slots included


def test_accepted_drafts_give_the_same_tokens_and_fewer_steps(model):
    """Right drafts are accepted (two tokens in one step), wrong ones rejected; tokens never change. Seeded
    sampling at temperature 1 and penalties too: sample-then-match draws the same numbers in the same order."""
    params = [GREEDY, SamplingParams(temperature=1.0, seed=5, max_tokens=MAX_NEW, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, repetition_penalty=1.3,
                             logprobs=2)] * 2
    prompts = PROMPTS
    plain = _engine(model, max_num_batched_tokens=64)
    want = run_to_end(plain, prompts, params)
    engine = _engine(model, max_num_batched_tokens=64, speculative_tokens=1)
    made = _oracle(engine, want, right=lambda seq: len(seq.output_ids) % 3 != 2)
    assert run_to_end(engine, prompts, params) == want
    stats = engine.stats()
    assert stats["spec_accepted_tokens"] > 0 and stats["spec_tokens_per_step"] > 1.5
    assert stats["spec_accepted_tokens"] <= sum(made)
    assert stats["spec_draft_tokens"] - stats["spec_accepted_tokens"] >= 1  # wrong drafts were verified too
    assert engine.timings["steps"] < plain.timings["steps"]
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_drafts_equal_the_mtp_module_run_without_a_cache(model):
    """The MTP cache (its own pool, the main block tables, filled across chunks, prefix hits and verify rows)
    gives the drafts that the MTP module computes over the whole sequence at once."""
    engine = _engine(model, max_num_batched_tokens=64, speculative_tokens=1)
    runner, seen = engine.speculative, []
    propose = runner.propose

    def recording():
        propose()
        seen.extend((list(seq.tokens), d[0]) for seq, (_, d) in runner.drafts.items())

    runner.propose = recording
    run_to_end(engine, PROMPTS[:4], [GREEDY] * 4)
    assert len(seen) >= 4 * (MAX_NEW - 1)
    checked = 0
    with torch.no_grad():
        for tokens, draft in seen:
            ids = torch.tensor([tokens])
            hidden = model.hidden_states(ids[:, :-1])
            logits = model.mtp_logits(hidden, ids[:, 1:])[0, -1]
            top = logits.topk(2).values
            if top[0] - top[1] > 1e-3:  # skip near-ties
                assert draft == int(logits.argmax())
                checked += 1
    assert checked >= len(seen) // 2


def test_llm_and_errors(model, folder):
    with pytest.raises(ValueError, match="speculative_tokens must be between 0 and 1"):
        _engine(model, speculative_tokens=2)
    mtp = model.mtp
    model.mtp = torch.nn.ModuleList()
    try:
        with pytest.raises(ValueError, match="speculative_tokens: this model has no multi-token-prediction"):
            _engine(model, speculative_tokens=1)
    finally:
        model.mtp = mtp
    llm = LLM(str(folder), device="cpu", progress=False, speculative_tokens=1, kv_cache_memory=1 << 24)
    assert isinstance(llm.engine.runner, SpeculativeRunner)
    out = llm.generate([PROMPTS[0]], GREEDY)
    assert out[0].outputs[0].token_ids == run_to_end(_engine(model), [PROMPTS[0]], [GREEDY])["r0"]


def test_acceptance_counters_reach_metrics(model):
    from selfseek.server.metrics import _EngineCollector

    engine = _engine(model, max_num_batched_tokens=64, speculative_tokens=1)
    want = run_to_end(_engine(model, max_num_batched_tokens=64), PROMPTS[:2], [GREEDY] * 2)
    made = _oracle(engine, want, right=lambda seq: True)
    run_to_end(engine, PROMPTS[:2], [GREEDY] * 2)
    stats = engine.stats()
    assert stats["spec_accepted_per_position"] == [stats["spec_accepted_tokens"]] and sum(made) > 0
    metrics = {m.name: m for m in _EngineCollector(engine.stats, "tiny", None).collect()}
    assert metrics["selfseek:spec_decode_num_draft_tokens"].samples[0].value == stats["spec_draft_tokens"]
    per_pos = metrics["selfseek:spec_decode_num_accepted_tokens_per_pos"].samples
    assert [(s.labels["position"], s.value) for s in per_pos] == [("0", stats["spec_accepted_tokens"])]


def test_preemption_with_drafts_loses_nothing(model):
    """A pool so small that sequences are preempted (drafts dropped, recomputed later) and draft slots are
    sometimes refused: the same tokens, every block back."""
    cfg = model.config
    per_block = 16 * cfg.num_hidden_layers * cfg.kv_values_per_token_per_layer * 4
    prompts, params = PROMPTS[:4], [GREEDY] * 4
    want = run_to_end(_engine(model, max_num_batched_tokens=64), prompts, params)
    engine = LLMEngine(model, None, EngineArgs(kv_cache_memory=14 * per_block, block_size=16,
                                               max_num_batched_tokens=64, speculative_tokens=1))
    made = _oracle(engine, want, right=lambda seq: True)
    assert run_to_end(engine, prompts, params) == want
    assert engine.scheduler.num_preemptions > 0 and sum(made) > 0 and engine.stats()["spec_accepted_tokens"] > 0
    assert engine.blocks.num_free == engine.blocks.num_blocks
