"""Next tokens for a whole batch in one pass: penalties, logit bias, logits processors (grammar constraints),
temperature, top-k, top-p, min-p, per-request seeds, and logprobs of the model's own distribution.

No full sort of the vocabulary: greedy rows take the argmax; rows with only a temperature draw from the
softmax of the whole row; rows with top-k/top-p/min-p filter a `torch.topk` candidate set (top_k if set,
else 64, then 1024 most likely tokens) and sort the whole row only when the candidates cannot decide the
filter exactly (top-p needs more mass than they hold and min-p does not cut inside them). The filtered
distribution is the one the sort-based definition gives. A draw is one uniform per row against the
cumulative sum (measured cheaper here than Gumbel-max / an exponential race, whose per-token noise costs
more than the softmax itself).

A seeded request draws from its own CPU generator, one number per token, so its tokens do not depend on
what else is in the batch; unseeded rows draw together.

Per-sequence work is guarded: a processor that raises, a row left with no allowed token or non-finite
logits fails that sequence only (returned in `failures`), never the batch.
"""

from __future__ import annotations

import torch

from selfseek.engine.sequence import PenaltyState, Sequence
from selfseek.kernels import fused_ops

CANDIDATE_TIERS = (64, 1024)  # candidate sets tried for top-p / min-p rows without top_k, then the whole row


def top_logprobs(logprobs: torch.Tensor, token: int, k: int) -> dict[int, float]:
    """The k most likely tokens with their logprobs (descending), plus the chosen token if not among them."""
    out: dict[int, float] = {}
    if k:
        values, ids = logprobs.topk(k)
        out = dict(zip(ids.tolist(), values.tolist(), strict=True))
    out.setdefault(token, logprobs[token].item())
    return out


def _penalty_state(seq: Sequence, row: torch.Tensor) -> PenaltyState:
    """The sequence's token statistics, extended with the tokens added since its last step (no rebuild)."""
    st = seq.penalty_state
    if st is None or st.counts.device != row.device or st.counts.numel() != row.numel():
        empty = torch.zeros(0, dtype=torch.long, device=row.device)
        st = seq.penalty_state = PenaltyState(torch.zeros_like(row), empty, empty)
    p = seq.params
    if (p.presence_penalty or p.frequency_penalty) and st.num_counted < len(seq.output_ids):
        new = seq.output_ids[st.num_counted :]
        st.counts.index_add_(0, torch.tensor(new, device=row.device),
                             torch.ones(len(new), device=row.device, dtype=row.dtype))
        st.out_ids = _extend(st.out_ids, st.out, new)
        st.num_counted = len(seq.output_ids)
    if p.repetition_penalty != 1 and st.num_seen < seq.num_tokens:
        st.seen_ids = _extend(st.seen_ids, st.seen, seq.token_slice(st.num_seen))
        st.num_seen = seq.num_tokens
    return st


def _extend(ids: torch.Tensor, members: set[int], tokens: list[int]) -> torch.Tensor:
    fresh = [t for t in dict.fromkeys(tokens) if t not in members]
    if not fresh:
        return ids
    members.update(fresh)
    return torch.cat([ids, torch.tensor(fresh, dtype=torch.long, device=ids.device)])


def _apply_penalties(row: torch.Tensor, seq: Sequence) -> None:
    """In place: repetition penalty over prompt and output (as HF and vLLM do), then presence/frequency over
    the output (OpenAI); only the distinct tokens concerned are read and written."""
    p = seq.params
    st = _penalty_state(seq, row)
    if p.repetition_penalty != 1 and len(st.seen_ids):
        vals = row[st.seen_ids]
        row[st.seen_ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and len(st.out_ids):
        row[st.out_ids] -= p.frequency_penalty * st.counts[st.out_ids] + p.presence_penalty


def _bias_of(seq: Sequence, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequence's logit bias as (token ids, values) tensors, built and checked once per sequence (an id
    outside the vocabulary must fail here, on the host: on a GPU the indexed add would abort the device)."""
    cached = seq.logit_bias_tensors
    if cached is None or cached[0].device != device:
        bias = seq.params.logit_bias
        ids = [int(t) for t in bias]
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"logit_bias has token ids outside the vocabulary [0, {vocab})")
        cached = seq.logit_bias_tensors = (torch.tensor(ids, dtype=torch.long, device=device),
                                           torch.tensor(list(bias.values()), dtype=torch.float32, device=device))
    return cached


def _apply_logit_bias(work: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    """Every row's bias in one indexed add (a 1000-entry bias on 8 rows is one op, not 8000)."""
    pairs = [_bias_of(seqs[i], work.shape[-1], work.device) for i in rows]
    r = torch.cat([torch.full((len(c),), i, dtype=torch.long, device=work.device)
                   for i, (c, _) in zip(rows, pairs, strict=True)])
    work.index_put_((r, torch.cat([c for c, _ in pairs])), torch.cat([v for _, v in pairs]).to(work.dtype),
                    accumulate=True)


def sample(
    logits: torch.Tensor, seqs: list[Sequence]
) -> tuple[list[int | None], list[dict[int, float] | None], dict[int, BaseException]]:
    """logits [N, vocab] (one row per sequence) -> (the next token of each, its logprobs if asked, failures).
    A failed row (index -> exception) has token None; every other row is sampled as if it were alone."""
    raw = logits.float()
    failures: dict[int, BaseException] = {}
    penalized = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty
                 or s.params.repetition_penalty != 1]
    biased = [i for i, s in enumerate(seqs) if s.params.logit_bias]
    constrained = [i for i, s in enumerate(seqs) if s.processors]
    work = raw.clone() if penalized or biased or constrained else raw
    for i in penalized:
        _guard(failures, i, _apply_penalties, work[i], seqs[i])
    if biased:
        try:
            _apply_logit_bias(work, seqs, biased)
        except Exception:  # find the row at fault; the others get their bias
            for i in biased:
                _guard(failures, i, _apply_logit_bias, work, seqs, [i])
    for i in constrained:  # after penalties, before any choice; logprobs below stay those of the raw distribution
        _guard(failures, i, _run_processors, work, i, seqs[i])
    checked = [i for i in constrained if i not in failures]  # what a processor returned must leave a choice
    if checked:
        rows = work[checked]
        for i, b in zip(checked, (rows.isnan().any(dim=-1) | (rows == float("-inf")).all(dim=-1)).tolist(),
                        strict=True):
            if b:
                failures[i] = ValueError("no token is allowed: every logit is -inf or one is NaN")

    tokens: list[int | None] = [None] * len(seqs)
    ok = [i for i in range(len(seqs)) if i not in failures]
    greedy = [i for i in ok if seqs[i].params.greedy]
    if greedy:
        # every row: cheaper than gathering the greedy ones first (max(dim).indices: the first maximum, NaN wins
        # alike; in a kernel on the CPU, where torch's reduction took 2.9 ms for 16 rows of a 129k vocabulary)
        best = fused_ops.argmax_rows(work)
        for i in greedy:
            tokens[i] = best[i]
    random_rows = [i for i in ok if not seqs[i].params.greedy]
    if random_rows:
        try:
            drawn = sample_rows(_rows(work, random_rows), [seqs[i] for i in random_rows])
        except Exception:  # one row's parameters broke the batch: sample each alone, fail only that one
            drawn = [_guard(failures, i, lambda i=i: sample_rows(work[[i]], [seqs[i]])[0]) for i in random_rows]
        for i, t in zip(random_rows, drawn, strict=True):
            if i not in failures:
                tokens[i] = t

    logprobs: list[dict[int, float] | None] = [None] * len(seqs)
    want = [i for i in ok if seqs[i].params.logprobs is not None and i not in failures]
    if want:
        lp = raw[want].log_softmax(dim=-1)
        for j, i in enumerate(want):
            logprobs[i] = top_logprobs(lp[j], tokens[i], seqs[i].params.logprobs)
    return tokens, logprobs, failures


def _rows(t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """t[idx] without a copy when idx is every row in order."""
    return t if idx == list(range(t.shape[0])) else t[idx]


def _guard(failures: dict[int, BaseException], i: int, fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        failures[i] = e
        return None


def _run_processors(work: torch.Tensor, i: int, seq: Sequence) -> None:
    for proc in seq.processors:
        out = proc(seq.output_ids, work[i])
        if out is not None and out is not work[i]:
            work[i] = out


def _filters(p, vocab: int) -> bool:
    return 0 < p.top_k < vocab or p.top_p < 1 or p.min_p > 0


def sample_rows(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """Temperature sampling (with top-k / top-p / min-p) of every row; logits [R, vocab] after penalties."""
    vocab = logits.shape[-1]
    params = [s.params for s in seqs]
    temp = torch.tensor([p.temperature for p in params], device=logits.device, dtype=logits.dtype)[:, None]
    scaled = logits / temp
    out = [0] * len(seqs)
    plain = [j for j, p in enumerate(params) if not _filters(p, vocab)]
    if plain:  # the whole row, no sort
        probs = _rows(scaled, plain).softmax(dim=-1)
        for j, t in zip(plain, _draw(probs, [seqs[j] for j in plain]), strict=True):
            out[j] = t
    rest = [j for j, p in enumerate(params) if _filters(p, vocab)]
    if rest:
        probs, ids = filtered_probs(_rows(scaled, rest), [params[j] for j in rest])
        picks = torch.tensor(_draw(probs, [seqs[j] for j in rest]), device=ids.device)
        for j, token in zip(rest, ids.gather(1, picks[:, None]).squeeze(1).tolist(), strict=True):
            out[j] = token
    return out


def filtered_probs(scaled: torch.Tensor, params: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature-scaled logits [R, vocab] -> (probs [R, K], token ids [R, K]): the top-k / top-p / min-p
    distribution of every row, exactly. A row with top_k takes its k most likely tokens; a row without tries
    CANDIDATE_TIERS candidates in turn (most rows settle at the first) and its whole sorted row last."""
    vocab = scaled.shape[-1]
    rows = list(range(len(params)))
    lse = scaled.logsumexp(dim=-1)  # the normalizer of rows without top_k, once
    probs = ids = None
    for tier in (*CANDIDATE_TIERS, vocab):
        counts = [min(params[r].top_k if 0 < params[r].top_k < vocab else tier, vocab) for r in rows]
        p, i, exact = filtered_candidates(_rows(scaled, rows), [params[r] for r in rows], counts, lse[rows])
        if probs is None:
            probs, ids = torch.zeros(len(params), p.shape[1], device=p.device, dtype=p.dtype), i.new_zeros(
                len(params), p.shape[1])
        elif p.shape[1] > probs.shape[1]:  # pad earlier rows with zero-probability columns
            pad = p.shape[1] - probs.shape[1]
            probs, ids = torch.nn.functional.pad(probs, (0, pad)), torch.nn.functional.pad(ids, (0, pad))
        done = [n for n, e in enumerate(exact) if e]
        idx = torch.tensor([rows[n] for n in done], dtype=torch.long, device=p.device)
        probs[idx, : p.shape[1]], ids[idx, : p.shape[1]] = p[done], i[done]
        rows = [rows[n] for n, e in enumerate(exact) if not e]
        if not rows:
            break
    return probs, ids


def filtered_candidates(
    scaled: torch.Tensor, params: list, ks: list[int], lse: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Temperature-scaled logits [R, vocab] -> (probs [R, K], token ids [R, K], exact per row).

    Row r keeps its ks[r] most likely tokens as candidates (K = max ks), then applies, as the sort-based
    definition does: top-k (softmax over the k most likely), top-p (the smallest prefix whose mass reaches
    top_p), min-p (drop tokens below min_p x the top probability), and renormalizes. A row without top_k is
    normalized over the whole vocabulary and is exact only if tokens outside its candidates are certainly cut."""
    vocab = scaled.shape[-1]
    k_max = max(ks)
    vals, ids = scaled.topk(k_max, dim=-1) if k_max < vocab else scaled.sort(dim=-1, descending=True)
    dev = scaled.device
    rank = torch.arange(k_max, device=dev)[None, :]
    kk = torch.tensor(ks, device=dev)[:, None]
    vals = vals.masked_fill(rank >= kk, float("-inf"))
    has_top_k = torch.tensor([0 < p.top_k < vocab for p in params], device=dev)
    # top-k rows: normalized over the k kept; others: over the whole vocabulary
    lse = scaled.logsumexp(dim=-1) if lse is None else lse  # of the whole row
    lse = torch.where(has_top_k, vals.logsumexp(dim=-1), lse)[:, None]
    probs = (vals - lse).exp()
    mass = probs.sum(dim=-1)  # before top-p / min-p
    last = probs.gather(1, (kk - 1).clamp(max=k_max - 1)).squeeze(1)  # smallest candidate
    top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=probs.dtype)[:, None]
    use_top_p = top_p < 1
    probs = probs.masked_fill(use_top_p & (probs.cumsum(dim=-1) - probs >= top_p), 0.0)
    min_p = torch.tensor([p.min_p for p in params], device=dev, dtype=probs.dtype)[:, None]
    cut = min_p * probs[:, :1]
    probs = probs.masked_fill(probs < cut, 0.0)
    # Outside the candidates every token is no more likely than `last`: certainly dropped when the
    # candidates' mass already reaches top_p, or when `last` itself falls under the min-p cut.
    exact = has_top_k | (kk.squeeze(1) >= vocab) | (use_top_p.squeeze(1) & (mass >= top_p.squeeze(1))) \
        | (last < cut.squeeze(1))
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs, ids, exact.tolist()


DRAW_BLOCK = 1024  # wide rows are drawn in two levels: a block by its mass, then a token inside it


def _draw(probs: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """Per row, a column drawn with probability probs[r, j] (rows need not sum to 1): one uniform per row
    against the row's cumulative mass, accumulated in float64 so that no token's share is lost to rounding.
    A wide row (the whole vocabulary) sums blocks of DRAW_BLOCK first, then accumulates only the chosen block.
    A seeded row takes its uniform from its own CPU generator: the same seed gives the same tokens on any
    device, in any batch. (One uniform per row costs less than Gumbel-max's per-token noise.)"""
    n, width = probs.shape
    u = torch.rand(n, 1, dtype=torch.float64)
    for r, seq in enumerate(seqs):
        if seq.generator is not None:
            u[r, 0] = torch.rand(1, generator=seq.generator, dtype=torch.float64)[0]
    u = u.to(probs.device)
    if width <= 4 * DRAW_BLOCK:
        return _inverse_cdf(probs, u).tolist()
    full = width // DRAW_BLOCK * DRAW_BLOCK
    sums = torch.cat([probs.unfold(1, DRAW_BLOCK, DRAW_BLOCK).sum(dim=-1, dtype=torch.float64),
                      probs[:, full:].sum(dim=-1, keepdim=True, dtype=torch.float64)], dim=1)
    cdf = sums.cumsum(dim=-1)
    target = u * cdf[:, -1:]
    block = torch.searchsorted(cdf, target, right=True).clamp_(max=sums.shape[1] - 1)
    while True:  # rounding may point at a block without mass: step back to one with some
        empty = sums.gather(1, block) <= 0
        if not empty.any():
            break
        block = torch.where(empty, block - 1, block)
    within = (target - (cdf.gather(1, block) - sums.gather(1, block))) / sums.gather(1, block)
    out = []
    for r, b in enumerate(block.squeeze(1).tolist()):
        start = b * DRAW_BLOCK
        seg = probs[r : r + 1, start : start + DRAW_BLOCK]
        out.append(start + int(_inverse_cdf(seg, within[r : r + 1].clamp(0, 1))[0]))
    return out


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first column whose cumulative mass exceeds u x the row's mass; never a zero-probability column."""
    cdf = probs.double().cumsum(dim=-1)
    j = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[1] - 1)
    # u x mass rounding up to the whole mass would pass the last token: take the last one with mass instead
    last = probs.shape[1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1, keepdim=True)
    return torch.minimum(j, last).squeeze(1)
