"""Next-token choice from logits: temperature, top-k, top-p, min-p, and the logprobs a request asks for."""

from __future__ import annotations

import torch

from selfseek.sampling_params import SamplingParams


def top_logprobs(logprobs: torch.Tensor, token: int, k: int) -> dict[int, float]:
    """The k most likely tokens with their logprobs (descending), plus the chosen token if not among them."""
    out: dict[int, float] = {}
    if k:
        values, ids = logprobs.topk(k)
        out = dict(zip(ids.tolist(), values.tolist(), strict=True))
    out.setdefault(token, logprobs[token].item())
    return out


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> tuple[int, dict[int, float] | None]:
    """logits [vocab] -> (token id, top logprobs or None). Logprobs are of the model's distribution (fp32)."""
    logits = logits.float()
    if params.greedy:
        token = int(logits.argmax())
    else:
        scaled = logits / params.temperature
        if params.top_k > 0:
            kth = scaled.topk(min(params.top_k, scaled.numel())).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = scaled.softmax(-1)
        if params.min_p > 0:
            probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
        if params.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
            drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
        probs = probs / probs.sum()
        if generator is not None:  # seeded generators live on the CPU so a seed means the same on any device
            probs = probs.cpu()
        token = int(torch.multinomial(probs, 1, generator=generator))
    if params.logprobs is None:
        return token, None
    return token, top_logprobs(logits.log_softmax(-1), token, params.logprobs)
