"""Next tokens for a whole batch in one pass: penalties, logit bias, logits processors (grammar constraints),
temperature, top-k, top-p, min-p, per-request seeds, and logprobs of the model's own distribution.

A seeded request draws from its own CPU generator, one row at a time, so its tokens do not depend on
what else is in the batch; unseeded rows draw together.
"""

from __future__ import annotations

import torch

from selfseek.engine.sequence import Sequence


def top_logprobs(logprobs: torch.Tensor, token: int, k: int) -> dict[int, float]:
    """The k most likely tokens with their logprobs (descending), plus the chosen token if not among them."""
    out: dict[int, float] = {}
    if k:
        values, ids = logprobs.topk(k)
        out = dict(zip(ids.tolist(), values.tolist(), strict=True))
    out.setdefault(token, logprobs[token].item())
    return out


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """In place on rows whose request asks for repetition/presence/frequency penalties or a logit bias."""
    for i, seq in enumerate(seqs):
        p = seq.params
        if not p.has_penalties:
            continue
        row = logits[i]
        if p.repetition_penalty != 1:  # over prompt and output, as HF and vLLM do
            seen = torch.tensor(sorted(set(seq.tokens)), device=row.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
            out = torch.tensor(seq.output_ids, device=row.device)
            counts = torch.zeros_like(row).scatter_add_(0, out, torch.ones_like(out, dtype=row.dtype))
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        for token, bias in p.logit_bias.items():
            row[int(token)] += bias
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict[int, float] | None]]:
    """logits [N, vocab] (one row per sequence) -> the next token of each and its logprobs if asked."""
    raw = logits.float()
    work = apply_penalties(raw.clone(), seqs) if any(s.params.has_penalties for s in seqs) else raw
    constrained = [i for i, s in enumerate(seqs) if s.params.logits_processors]
    if constrained:  # after penalties, before any choice; logprobs below stay those of the raw distribution
        work = work.clone() if work is raw else work
        for i in constrained:
            for proc in seqs[i].params.logits_processors:
                work[i] = proc(seqs[i].output_ids, work[i])
    tokens = work.argmax(dim=-1)
    random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if random_rows:
        idx = torch.tensor(random_rows, device=work.device)
        probs = _filtered_probs(work[idx], [seqs[i].params for i in random_rows])
        unseeded = [j for j, i in enumerate(random_rows) if seqs[i].generator is None]
        if unseeded:
            u = torch.tensor(unseeded, device=work.device)
            tokens[idx[u]] = torch.multinomial(probs[u], 1).squeeze(1)
        for j, i in enumerate(random_rows):
            g = seqs[i].generator
            if g is not None:  # CPU generator: the same seed means the same tokens on any device
                tokens[i] = int(torch.multinomial(probs[j].cpu(), 1, generator=g))
    chosen = tokens.tolist()
    logprobs: list[dict[int, float] | None] = [None] * len(seqs)
    want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if want:
        lp = raw[want].log_softmax(dim=-1)
        for j, i in enumerate(want):
            logprobs[i] = top_logprobs(lp[j], chosen[i], seqs[i].params.logprobs)
    return chosen, logprobs


def _filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    """Temperature, then top-k, then top-p (smallest prefix reaching p), then min-p; rows renormalised."""
    temp = torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
    sorted_logits, order = (logits / temp).sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else logits.shape[-1] for p in params], device=logits.device)
    sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device)[:, None]
    probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    min_p = torch.tensor([p.min_p for p in params], device=logits.device)[:, None]
    probs = probs.masked_fill(probs < min_p * probs[:, :1], 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(1, order, probs)
