"""A/B of kernels/fused_ops (fused residual + RMSNorm, rotary) in one process, load-independent measures first.

    .venv/bin/python benchmarks/fused_ops_ab.py [MODEL] [ROUNDS]      # MODEL: default model when omitted or ""

Prints: greedy tokens and logprobs of both paths, aten ops per decode step (torch.profiler), and the engine
thread's CPU time per decode step (time.thread_time; 1 thread) over ROUNDS blocks of 10 steps per path,
interleaved ABBA so a load change on a shared machine hits both.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from selfseek.engine.engine import EngineArgs, LLMEngine
from selfseek.kernels import fused_ops
from selfseek.models.model import CausalLM
from selfseek.sampling_params import SamplingParams
from selfseek.weights import load_model

BLOCK = 10


def main() -> None:
    src = (sys.argv[1] if len(sys.argv) > 1 else "") or None
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    torch.set_num_threads(1)
    model, tok = load_model(src, "auto", "cpu", progress=False)
    kernel, fused_stack = fused_ops._load, CausalLM._fused_residuals

    def use_fused(on: bool) -> None:
        fused_ops._load = kernel if on else (lambda: None)  # the wrappers' torch path, quant kernels kept
        CausalLM._fused_residuals = fused_stack if on else (lambda self: False)

    eng = LLMEngine(model, tok, EngineArgs(max_num_seqs=4, kv_cache_memory=1 << 26, max_num_batched_tokens=512))
    prompt = list(range(100, 164))
    runs = {}
    for on in (False, True):
        use_fused(on)
        eng.add_request(f"t{on}", prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0))
        ids, lps = [], []
        while eng.has_work():
            for d in eng.step():  # RequestDelta: the tokens new since the last step
                ids += d.token_ids
                lps += [lp[t] for lp, t in zip(d.logprobs or [], d.token_ids, strict=True)]
        runs[on] = (ids, lps)
    drift = max((abs(a - b) for a, b in zip(runs[False][1], runs[True][1], strict=True)), default=None)
    print(f"greedy tokens equal: {runs[False][0] == runs[True][0]} ({len(runs[True][0])}), max |dlogprob| {drift}")
    eng.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=rounds * 2 * (BLOCK + 1) + 20,
                                                ignore_eos=True))
    for _ in range(4):
        eng.step()
    for on in (False, True):
        use_fused(on)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                eng.step()
        n = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / 3
        print(f"fused={on}: aten ops per decode step {n:.0f}")
    cpu: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for on in (False, True) if r % 2 == 0 else (True, False):
            use_fused(on)
            eng.step()
            t0 = time.thread_time()
            for _ in range(BLOCK):
                eng.step()
            cpu[on].append((time.thread_time() - t0) / BLOCK * 1e3)
    for on, v in cpu.items():
        v.sort()
        print(f"fused={on}: engine-thread CPU ms/step median {v[len(v) // 2]:.2f}, min {v[0]:.2f} "
              f"({len(v)} blocks of {BLOCK})")


if __name__ == "__main__":
    main()
