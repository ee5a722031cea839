"""The fp8 cache (`--kv-cache-dtype fp8`: MLA latents, GQA K/V) against fp32 and bf16 caches: bytes per token,
and the drift of next-token log-probabilities when every token after a short prefill is decoded through the
paged cache.

    .venv/bin/python benchmarks/fp8_cache.py --seqs 4 --len 128 --threads 1   # the default model (smollm2)
    .venv/bin/python benchmarks/fp8_cache.py --model runs/tiny-coder/final --seqs 8 --len 256

Teacher-forced: each sequence (the first --len tokens of standard-library files) is prefilled for --prefill
tokens, then decoded one token a step, all sequences in one batch, so every later position attends through the
cache. Reported per cache dtype against the fp32 cache: mean and max |delta logprob| of the actual next token,
mean KL(fp32 || dtype), top-1 agreement, and the max context a 1 GiB cache holds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from selfseek.engine.runner import kv_bytes_per_token
from selfseek.models.batch import batch_from_tables
from selfseek.weights import load_model

try:
    from spec_decode import stdlib_prompts
except ImportError:  # run from the repository root as a module path
    from benchmarks.spec_decode import stdlib_prompts


@torch.inference_mode()
def teacher_forced_logprobs(model, seqs: torch.Tensor, prefill: int, dtype: torch.dtype) -> torch.Tensor:
    """seqs [S, L] -> log-probs [S, L - prefill, vocab] of positions prefill-1 .. L-2 (next-token predictions)."""
    S, L = seqs.shape
    bs = 16
    per_seq = -(-L // bs)
    tables = torch.arange(S * per_seq, dtype=torch.int32).view(S, per_seq)
    pools = model.new_kv_pools(S * per_seq * bs, dtype)
    rows = list(range(S))
    h = model.hidden_states(seqs[:, :prefill].reshape(-1), batch_from_tables(tables, rows, [0] * S, [prefill] * S, bs),
                            pools)
    out = [model.logits(h.view(S, prefill, -1)[:, -1]).float().log_softmax(-1)]
    for p in range(prefill, L - 1):
        h = model.hidden_states(seqs[:, p], batch_from_tables(tables, rows, [p] * S, [1] * S, bs), pools)
        out.append(model.logits(h).float().log_softmax(-1))
    return torch.stack(out, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a checkpoint (MLA or GQA; default: the default model, smollm2)")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--len", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tokenizer = load_model(a.model, "float32", torch.device("cpu"), False, None, "none")
    seqs = torch.tensor(stdlib_prompts(tokenizer, a.seqs, a.len))
    ref = teacher_forced_logprobs(model, seqs, a.prefill, torch.float32)
    target = seqs[:, a.prefill :]
    rows = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        lp = ref if dtype == torch.float32 else teacher_forced_logprobs(model, seqs, a.prefill, dtype)
        chosen = (lp.gather(-1, target[..., None]) - ref.gather(-1, target[..., None])).abs()
        kl = (ref.exp() * (ref - lp)).sum(-1)
        per_token = kv_bytes_per_token(model, dtype)
        rows.append({"cache": name, "bytes_per_token": per_token,
                     "max_context_1GiB": (1 << 30) // per_token,
                     "mean_abs_dlogprob": float(chosen.mean()), "max_abs_dlogprob": float(chosen.max()),
                     "mean_kl": float(kl.mean()),
                     "top1_agreement": float((lp.argmax(-1) == ref.argmax(-1)).float().mean())})
    print(f"{'cache':>5} {'B/token':>8} {'ctx/GiB':>9} {'mean|dlp|':>10} {'max|dlp|':>9} {'mean KL':>9} {'top-1':>7}")
    for r in rows:
        print(f"{r['cache']:>5} {r['bytes_per_token']:>8} {r['max_context_1GiB']:>9} {r['mean_abs_dlogprob']:>10.2e} "
              f"{r['max_abs_dlogprob']:>9.2e} {r['mean_kl']:>9.2e} {r['top1_agreement']:>7.4f}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
