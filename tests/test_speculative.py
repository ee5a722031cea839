"""Speculative decoding with the MTP module (engine/speculative.py): the same tokens as without it, under
continuous batching, chunked prefill and prefix caching; drafts equal to the MTP module run without a cache."""

from __future__ import annotations

import pytest
import torch
from checkpoints import VOCAB, add_tokenizer, build_hf_model, run_to_end
from safetensors.torch import load_file, save_file

from selfseek import LLM, SamplingParams
from selfseek.engine.engine import EngineArgs, LLMEngine
from selfseek.engine.speculative import SpeculativeRunner, speculative_sample, target_probs
from selfseek.models.batch import build_batch
from selfseek.weights.safetensors import load_checkpoint

MAX_NEW = 10


def with_mtp(folder, out, seed: int):
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
    out = with_mtp(base, base / "mtp", request.param)
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


def oracle(engine: LLMEngine, reference: dict[str, list[int]], right: callable,
           seen: list | None = None) -> list[bool]:
    """Replace each draft to verify with the true next token (right(seq, j) true) or a wrong one; -> whether
    each draft made was right. Exercises acceptance, which random MTP weights rarely reach. `seen` gets each
    sequence's drafts as the MTP module made them: (request id, tokens generated, drafts)."""
    runner, made = engine.speculative, []
    schedule = runner.schedule_drafts

    def patched(scheduled):
        for s in scheduled:  # blocks that only rejected drafts reached were freed after the last step
            if s.num_new == 1 and s.samples:
                assert len(s.seq.block_table) == engine.blocks.blocks_needed(s.seq.num_tokens)
        schedule(scheduled)
        for seq, draft in runner.verifying.items():
            ref, k = reference[seq.request_id], len(seq.output_ids)
            if seen is not None:
                seen.append((seq.request_id, k, list(draft.tokens)))
            for j in range(min(len(draft.tokens), len(ref) - k)):
                ok = right(seq, j)
                draft.tokens[j] = ref[k + j] if ok else (ref[k + j] + 1) % VOCAB
                made.append(ok)

    runner.schedule_drafts = patched
    return made


@pytest.mark.parametrize(("batch", "k"), [([0], 1), ([0, 1, 2], 2), ([0, 1, 2, 3, 4, 5], 3)])
def test_greedy_tokens_equal_without_speculation(model, batch, k):
    prompts, params = [PROMPTS[i] for i in batch], [GREEDY] * len(batch)
    want = run_to_end(_engine(model, max_num_batched_tokens=64), prompts, params)
    engine = _engine(model, max_num_batched_tokens=64, speculative_tokens=k)
    assert run_to_end(engine, prompts, params) == want
    stats = engine.stats()
    assert stats["spec_verify_steps"] > 0
    assert stats["spec_verify_steps"] <= stats["spec_draft_tokens"] <= k * stats["spec_verify_steps"]
    assert engine.blocks.num_free == engine.blocks.num_blocks  # every block back, draft slots included


@pytest.mark.parametrize("k", [3])
def test_accepted_drafts_give_the_same_tokens_and_fewer_steps(model, k):
    """Right drafts are accepted (up to k + 1 tokens in one step), wrong ones rejected; tokens never change.
    Seeded sampling at temperature 1 and penalties too: sample-then-match draws the same numbers in the same
    order."""
    params = [GREEDY, SamplingParams(temperature=1.0, seed=5, max_tokens=MAX_NEW, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, repetition_penalty=1.3,
                             logprobs=2)] * 2
    prompts = PROMPTS
    plain = _engine(model, max_num_batched_tokens=64)
    want = run_to_end(plain, prompts, params)
    engine = _engine(model, max_num_batched_tokens=64, speculative_tokens=k)
    made = oracle(engine, want, right=lambda seq, j: (len(seq.output_ids) + j) % 4 != 3)
    assert run_to_end(engine, prompts, params) == want
    stats = engine.stats()
    assert stats["spec_accepted_tokens"] > 0 and stats["spec_tokens_per_step"] > 1.5
    assert stats["spec_accepted_tokens"] <= sum(made)
    assert stats["spec_draft_tokens"] - stats["spec_accepted_tokens"] >= 1  # wrong drafts were verified too
    assert engine.timings["steps"] < plain.timings["steps"]
    assert engine.blocks.num_free == engine.blocks.num_blocks


def _mtp_chain_logits(model, tokens: list[int], drafts: list[int]) -> list[torch.Tensor]:
    """Draft logits of d_1 .. d_{len(drafts)+1} after `tokens`, by the MTP module over the whole sequence at
    once, no cache: rows 0..N-2 take the main model's normed h_i and t_{i+1}, chain row N-2+j the module's own
    output of the row before and d_j."""
    with torch.no_grad():
        ids = torch.tensor([tokens])
        inputs = list(model.model.norm(model.hidden_states(ids[:, :-1])[0]))
        nxt, out = list(tokens[1:]), []
        for j in range(len(drafts) + 1):
            batch = build_batch([(None, 0, len(inputs))])
            x = model.mtp[0](torch.stack(inputs), model.embed(torch.tensor(nxt)),
                             model.rotary.cos_sin(batch.positions), batch)
            out.append(model.lm_head(x[-1]).float())
            if j < len(drafts):
                inputs.append(x[-1])
                nxt.append(drafts[j])
    return out


def _clear_argmax(logits: torch.Tensor) -> int | None:
    top = logits.topk(2)
    return int(top.indices[0]) if top.values[0] - top.values[1] > 1e-3 else None  # None: a near-tie


def test_chained_drafts_equal_the_mtp_module_run_without_a_cache(model):
    """The MTP cache (its own pool, the main block tables, filled across chunks, prefix hits and verify rows)
    and the chain (the module on its own output, k = 2) give the drafts that the MTP module computes over the
    whole sequence at once."""
    engine = _engine(model, max_num_batched_tokens=64, speculative_tokens=2)
    runner, seen = engine.speculative, []
    schedule = runner.schedule_drafts

    def recording(scheduled):
        schedule(scheduled)
        seen.extend((list(seq.tokens), list(d.tokens)) for seq, d in runner.verifying.items())

    runner.schedule_drafts = recording
    run_to_end(engine, PROMPTS[:4], [GREEDY] * 4)
    assert len(seen) >= 4 * (MAX_NEW // 3) and all(len(d) == 2 for _, d in seen)
    checked, seen = [0, 0], seen[::4]  # a quarter: the reference recomputes the whole sequence each time
    for tokens, drafts in seen:
        for j, logits in enumerate(_mtp_chain_logits(model, tokens, drafts[:1])):
            want = _clear_argmax(logits)
            if want is not None:
                assert drafts[j] == want
                checked[j] += 1
    assert min(checked) >= len(seen) // 2


def test_llm_and_errors(model, folder):
    with pytest.raises(ValueError, match="speculative_tokens must be between 0 and 3"):
        _engine(model, speculative_tokens=4)
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
    made = oracle(engine, want, right=lambda seq, j: True)
    run_to_end(engine, PROMPTS[:2], [GREEDY] * 2)
    stats = engine.stats()
    assert stats["spec_accepted_per_position"] == [stats["spec_accepted_tokens"]] and sum(made) > 0
    metrics = {m.name: m for m in _EngineCollector(engine.stats, "tiny", None).collect()}
    assert metrics["selfseek:spec_decode_num_draft_tokens"].samples[0].value == stats["spec_draft_tokens"]
    per_pos = metrics["selfseek:spec_decode_num_accepted_tokens_per_pos"].samples
    assert [(s.labels["position"], s.value) for s in per_pos] == [("0", stats["spec_accepted_tokens"])]


@pytest.mark.parametrize("k", [2])
def test_preemption_with_drafts_loses_nothing(model, k):
    """A pool so small that sequences are preempted (drafts dropped, recomputed later) and draft slots are
    sometimes refused: the same tokens, every block back."""
    cfg = model.config
    per_block = 16 * cfg.num_hidden_layers * cfg.kv_values_per_token_per_layer * 4
    prompts, params = PROMPTS[:4], [GREEDY] * 4
    want = run_to_end(_engine(model, max_num_batched_tokens=64), prompts, params)
    engine = LLMEngine(model, None, EngineArgs(kv_cache_memory=14 * per_block, block_size=16,
                                               max_num_batched_tokens=64, speculative_tokens=k))
    made = oracle(engine, want, right=lambda seq, j: True)
    assert run_to_end(engine, prompts, params) == want
    assert engine.scheduler.num_preemptions > 0 and sum(made) > 0 and engine.stats()["spec_accepted_tokens"] > 0
    assert engine.blocks.num_free == engine.blocks.num_blocks


# ---- rejection sampling at temperature > 0 ---------------------------------------------------------------
def _chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper critical value of chi-square with df degrees of freedom at the one-sided normal quantile z
    (3.719: p = 1e-4), by the Wilson-Hilferty approximation (accurate to ~1% for df >= 10)."""
    c = 2 / (9 * df)
    return df * (1 - c + z * c**0.5) ** 3


def _two_tokens(P: torch.Tensor, Q: torch.Tensor, k: int, n: int, g: torch.Generator, rule) -> torch.Tensor:
    """n draws of the next two tokens after token 0 of a Markov "model" P[prev] with draft model Q[prev],
    by speculative rounds of k drafts under `rule` -> [n, 2]."""
    out = torch.full((n, 2), -1, dtype=torch.long)
    ctx, filled = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    while (todo := (filled < 2).nonzero().squeeze(1)).numel():
        drafts, prev = [], ctx[todo]
        for _ in range(k):
            prev = torch.multinomial(Q[prev], 1, generator=g).squeeze(1)
            drafts.append(prev)
        drafts = torch.stack(drafts, 1)  # [b, k]
        chain = torch.cat([ctx[todo, None], drafts], 1)  # the context of each verified row
        tokens, accepted = rule(P[chain], Q[chain[:, :k]], drafts, g)
        first = filled[todo] == 0  # the round's tokens fill x1 (and x2 when it emitted two) or x2 alone
        out[todo, 1 - first.long()] = tokens[:, 0]
        two = first & (accepted >= 1)
        out[todo[two], 1] = tokens[two, 1]
        filled[todo] += 1 + two.long()
        ctx[todo] = tokens[:, 0]
    return out


def _resample_from_p(p, q, drafts, g):
    """A wrong rule for the test's power: accept as speculative sampling does, resample from p, not p - q."""
    k = drafts.shape[1]
    pd, qd = p[:, :k].gather(2, drafts[..., None]).squeeze(-1), q.gather(2, drafts[..., None]).squeeze(-1)
    accepted = (torch.rand(drafts.shape, generator=g, dtype=p.dtype) * qd < pd).int().cumprod(1).sum(1)
    last = torch.multinomial(p[torch.arange(len(drafts)), accepted], 1, generator=g).squeeze(1)
    tokens = torch.cat([drafts, drafts[:, :1]], 1)
    tokens[torch.arange(len(drafts)), accepted] = last
    return tokens, accepted


def test_rejection_sampling_gives_the_target_distribution():
    """20,000 draws of two tokens, by speculative rounds of k = 2 and k = 3 drafts from a draft model unlike the
    target (whose rows have zeros, as top-k / top-p leave them): the joint counts pass a chi-square test at
    p = 1e-4 against the target's exact distribution; a wrong residual fails the same test."""
    g = torch.Generator().manual_seed(0)
    V, n = 6, 20_000
    P = (torch.randn(V, V, generator=g, dtype=torch.float64) * 1.2).softmax(-1)
    P[torch.arange(V), (torch.arange(V) + 1) % V] = 0  # a token each row never takes
    P /= P.sum(-1, keepdim=True)
    Q = (torch.randn(V, V, generator=g, dtype=torch.float64) * 1.2).softmax(-1)
    exact = (P[0][:, None] * P).reshape(-1)  # p(x1 | 0) p(x2 | x1)
    support = exact > 0
    critical = _chi2_critical(int(support.sum()) - 1)

    def chi2(draws: torch.Tensor) -> float:
        counts = torch.bincount(draws[:, 0] * V + draws[:, 1], minlength=V * V).double()
        assert counts[~support].sum() == 0  # never a token the target cannot give
        e = exact[support] * n
        return float(((counts[support] - e) ** 2 / e).sum())

    for k in (2, 3):
        assert chi2(_two_tokens(P, Q, k, n, g, speculative_sample)) < critical
    assert chi2(_two_tokens(P, Q, 2, n, g, _resample_from_p)) > critical


def test_rejection_sampling_in_the_engine_verifies_against_the_main_model(model):
    """Unseeded temperature > 0 (with top-p on one request), k = 2: every accept/resample decision gets the
    main model's distributions after the context and each draft (p, as the sampler would draw), and the MTP
    module's chained distributions the drafts were drawn from (q), both as computed without a cache."""
    import selfseek.engine.speculative as spec

    params = [SamplingParams(temperature=1.0, max_tokens=MAX_NEW, ignore_eos=True),
              SamplingParams(temperature=0.7, top_p=0.9, max_tokens=MAX_NEW, ignore_eos=True, logprobs=1)]
    engine = _engine(model, max_num_batched_tokens=64, speculative_tokens=2)
    calls, real = [], spec.speculative_sample

    def recording(p, q, drafts, generator=None):
        seq = next(s for s, d in engine.speculative.verifying.items() if d.tokens == drafts[0].tolist())
        out = real(p, q, drafts, generator)
        calls.append((list(seq.tokens), seq.params, p[0], q[0], drafts[0].tolist(), int(out[1][0])))
        return out

    torch.manual_seed(3)
    spec.speculative_sample = recording
    try:
        out = run_to_end(engine, PROMPTS[:2], params)
    finally:
        spec.speculative_sample = real
    assert [len(t) for t in out.values()] == [MAX_NEW, MAX_NEW]
    assert len(calls) >= 6 and engine.stats()["spec_accepted_tokens"] > 0
    assert engine.blocks.num_free == engine.blocks.num_blocks
    with torch.no_grad():
        for tokens, sp, p, q, drafts, _ in calls[::3]:  # a third: the reference recomputes the whole sequence
            main = model(torch.tensor([tokens + drafts]))[0, len(tokens) - 1 :].float()
            torch.testing.assert_close(p, target_probs(main, [sp] * 3), atol=2e-5, rtol=1e-3)
            mtp = torch.stack(_mtp_chain_logits(model, tokens, drafts[:1]))
            torch.testing.assert_close(q, target_probs(mtp, [sp] * 2), atol=2e-5, rtol=1e-3)
            assert all(q[j, d] > 0 for j, d in enumerate(drafts))


def test_blocks_only_rejected_drafts_reached_are_freed(model):
    """A 14-token prompt in 16-token blocks: three drafts after it need a second block; all rejected, that block
    is freed before the next step (checked by the oracle at every step), and the tokens do not change."""
    prompt = [_prompt(14, 7)]
    want = run_to_end(_engine(model), prompt, GREEDY)
    engine = _engine(model, speculative_tokens=3)
    made = oracle(engine, want, right=lambda seq, j: False)
    assert run_to_end(engine, prompt, GREEDY) == want
    assert len(made) >= 3 and not any(made) and engine.stats()["spec_accepted_tokens"] == 0
