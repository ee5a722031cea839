"""Accuracy of the opt-in int8-activation path (SELFSEEK_INT8_ACTIVATIONS, kernels.INT8_ACTIVATIONS) against the
float path on the same quantized weights: top-1 agreement and |logprob drift| over decode positions.

    .venv/bin/python benchmarks/int8_activations.py                                  # default model, q8 and q4
    .venv/bin/python benchmarks/int8_activations.py --model /root/v3-871m/model-q8_0.gguf --quantize none

The float path generates greedily (the engine, KV cache); then each whole sequence (prompt + generated tokens, fewer
than kernels.GEMM_MIN_ROWS so every linear takes the decode kernels) is run once per path, teacher-forced on those
tokens. Activations are quantized per row, so a row's result is what one decode step computes for it. Per position
that predicts a generated token: does the argmax agree, and |log p_int8(t) - log p_float(t)| of the float path's
token t (the next token of the sequence).
"""

from __future__ import annotations

import argparse

import torch

from selfseek import LLM, SamplingParams, kernels

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics state that",
    "Q: What is 17 times 23?\nA:",
]


def teacher_forced_logprobs(model: torch.nn.Module, ids: list[int], int8: bool) -> torch.Tensor:
    """log-softmax of the logits at every position of `ids` [len(ids), vocab], with or without int8 activations."""
    saved, kernels.INT8_ACTIVATIONS = kernels.INT8_ACTIVATIONS, int8
    try:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)
    finally:
        kernels.INT8_ACTIVATIONS = saved


def measure(model_name: str | None, quantize: int | None, new_tokens: int) -> dict:
    llm = LLM(model_name, quantize=quantize, progress=False)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    agree, drift, positions = 0, [], 0
    for out in llm.generate(PROMPTS, params):
        ids = list(out.prompt_token_ids) + list(out.outputs[0].token_ids)
        if len(ids) >= kernels.GEMM_MIN_ROWS:
            raise ValueError(f"prompt + {new_tokens} tokens = {len(ids)} rows: the GEMM path, not the decode kernels")
        p = len(out.prompt_token_ids)
        lp_f, lp_i = (teacher_forced_logprobs(llm.model, ids, int8)[p - 1 : len(ids) - 1] for int8 in (False, True))
        nxt = torch.tensor(ids[p:])
        agree += int((lp_f.argmax(-1) == lp_i.argmax(-1)).sum())
        drift.append((lp_i.gather(1, nxt[:, None]) - lp_f.gather(1, nxt[:, None])).abs().flatten())
        positions += len(nxt)
    d = torch.cat(drift)
    return {"positions": positions, "top1": agree / positions, "mean": d.mean().item(), "max": d.max().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the default model (SmolLM2)")
    p.add_argument("--quantize", default="8,4", help="comma list of 8, 4, none (a GGUF's own quantization)")
    p.add_argument("--new-tokens", type=int, default=40, help="generated tokens per prompt (5 prompts)")
    a = p.parse_args()
    if not kernels.available():
        raise SystemExit("native kernels unavailable: the int8-activation path needs them")
    print(f"{'model':<40} {'quant':>5} {'positions':>9} {'top-1 agree':>11} {'mean |dlogp|':>12} {'max |dlogp|':>11}")
    for q in a.quantize.split(","):
        r = measure(a.model, None if q == "none" else int(q), a.new_tokens)
        print(f"{a.model or 'default':<40} {q:>5} {r['positions']:>9} {r['top1']:>11.4f} {r['mean']:>12.5f} "
              f"{r['max']:>11.5f}", flush=True)


if __name__ == "__main__":
    main()
