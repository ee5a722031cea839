"""Non-kernel time of one decode step: the thread's CPU time per engine step (1 thread: all of torch's work; steadier
than wall time on a shared machine) minus the CPU time inside the native kernels (kernels.linear / kernels.moe and the
paged-attention C function), plus aten op counts per step (torch.profiler) and the greedy tokens and logprobs.

    .venv/bin/python benchmarks/decode_overhead.py --model /root/v3-871m/model-q8_0.gguf --context 512 --profile
    # before/after: a baseline tree (e.g. `git archive <commit> selfseek | tar -x -C /tmp/base`) and this one,
    # run alternately --pairs times each (a shared machine's load drifts), minima compared, tokens checked equal
    .venv/bin/python benchmarks/decode_overhead.py --model default --baseline /tmp/base --pairs 3

Each measuring process is this script run under `PYTHONPATH=<tree>`; the kernel timers wrap the functions the model
calls, so both trees are measured the same way.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="a GGUF / checkpoint path, or 'default' (load_model's)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=512, help="prompt tokens before the timed decode steps")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (the best is reported)")
    ap.add_argument("--profile", action="store_true", help="also count aten ops per step with torch.profiler")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--tokens-out", help="write the greedy tokens and logprobs of the timed steps here")
    ap.add_argument("--baseline", help="a tree holding the baseline's selfseek/: compare it with this one (A/B)")
    ap.add_argument("--pairs", type=int, default=3, help="with --baseline: alternating runs of each")
    args = ap.parse_args()
    if args.baseline:
        return compare(args)

    import selfseek
    import selfseek.kernels as K
    from selfseek.engine.engine import EngineArgs, LLMEngine
    from selfseek.models import attention_backend
    from selfseek.sampling_params import SamplingParams
    from selfseek.weights import load_model

    torch.set_num_threads(args.threads)
    model, tok = (load_model(progress=False) if args.model == "default" else
                  load_model(args.model, args.dtype, "cpu", progress=False))
    kernel_s = collections.Counter()

    def timed(name, f):
        def g(*a, **k):
            t = time.thread_time()
            try:
                return f(*a, **k)
            finally:
                kernel_s[name] += time.thread_time() - t
        return g

    for name in ("linear", "moe"):
        setattr(K, name, timed(name, getattr(K, name)))
    lib = attention_backend._kernel(torch.device("cpu"))
    if lib is not None:  # the C function itself, not its Python glue
        f = lib.selfseek_paged_attention
        lib.selfseek_paged_attention = timed("paged_attention", f)

    engine = LLMEngine(model, tok, EngineArgs(max_num_seqs=4, kv_cache_memory=2**28))
    random.seed(0)
    prompt = [random.randrange(100, min(30000, model.config.vocab_size)) for _ in range(args.context)]
    n_steps = 8 + args.rounds * args.steps + (20 if args.profile else 0)
    engine.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=n_steps + 4, ignore_eos=True,
                                                   logprobs=0))
    got_tokens, got_logprobs = [], []

    def step() -> None:
        for d in engine.step():
            got_tokens.extend(d.token_ids)
            got_logprobs.extend({str(k): v for k, v in lp.items()} for lp in d.logprobs or [])

    for _ in range(8):
        step()
    rounds = []
    for _ in range(args.rounds):
        kernel_s.clear()
        t, c = time.perf_counter(), time.thread_time()
        for _ in range(args.steps):
            step()
        wall = (time.perf_counter() - t) / args.steps * 1e3
        cpu = (time.thread_time() - c) / args.steps * 1e3
        k = {n: v / args.steps * 1e3 for n, v in kernel_s.items()}
        rounds.append({"step_ms": wall, "step_cpu_ms": cpu, "kernels_ms": k, "non_kernel_ms": cpu - sum(k.values())})
    best = min(rounds, key=lambda r: r["non_kernel_ms"])
    out = {"selfseek": selfseek.__file__, "model": args.model, "threads": args.threads, "context": args.context,
           "best": best, "rounds": rounds}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                step()
        ops = {e.key: e.count / 20 for e in prof.key_averages() if e.key.startswith("aten::")}
        out["aten_ops_per_step"] = sum(ops.values())
        out["aten_top"] = dict(sorted(ops.items(), key=lambda kv: -kv[1])[:25])
    print(f"{out['selfseek']}: step {best['step_ms']:.2f} ms wall, {best['step_cpu_ms']:.2f} ms CPU; kernels "
          + ", ".join(f"{n} {v:.2f}" for n, v in sorted(best["kernels_ms"].items()))
          + f" ms, non-kernel {best['non_kernel_ms']:.2f} ms CPU (best of {args.rounds} x {args.steps} steps)")
    if args.profile:
        print(f"aten ops per step: {out['aten_ops_per_step']:.0f}; top: "
              + ", ".join(f"{k[6:]} {v:g}" for k, v in out["aten_top"].items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    if args.tokens_out:
        with open(args.tokens_out, "w") as fh:
            json.dump({"tokens": got_tokens, "logprobs": got_logprobs}, fh)


def compare(args: argparse.Namespace) -> None:
    """Run baseline and working tree alternately, each in its own process; print the minima and check the tokens."""
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    here = Path(__file__).resolve()
    trees = {"before": str(Path(args.baseline).resolve()), "after": str(here.parent.parent)}
    passed = [f"--{k}={getattr(args, k)}" for k in ("model", "dtype", "threads", "context", "steps", "rounds")]
    passed += ["--profile"] if args.profile else []
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    tokens: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            for name, tree in trees.items():
                out, tok = Path(tmp, f"{name}{i}.json"), Path(tmp, f"{name}{i}.tokens.json")
                env = dict(os.environ, PYTHONPATH=tree)
                cmd = [sys.executable, str(here), *passed, "--json", str(out), "--tokens-out", str(tok)]
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
                runs[name].append(json.loads(out.read_text()))
                tokens[name] = json.loads(tok.read_text())
    print(f"{args.model}, {args.threads} thread(s), context {args.context}, {args.pairs} alternating runs each:")
    for name, rs in runs.items():
        nk = min(r["best"]["non_kernel_ms"] for r in rs)
        cpu = min(r["best"]["step_cpu_ms"] for r in rs)
        wall = min(r["best"]["step_ms"] for r in rs)
        ops = rs[0].get("aten_ops_per_step")
        print(f"  {name:6s} non-kernel {nk:6.2f} ms CPU (runs: "
              + ", ".join(f"{r['best']['non_kernel_ms']:.2f}" for r in rs)
              + f"), step {cpu:6.2f} ms CPU / {wall:6.2f} ms wall" + (f", aten ops/step {ops:.0f}" if ops else ""))
    a, b = tokens["before"], tokens["after"]
    diff = max((abs(x[k] - y[k]) for x, y in zip(a["logprobs"], b["logprobs"], strict=True) for k in x if k in y),
               default=0.0)
    print(f"  greedy tokens equal: {a['tokens'] == b['tokens']} ({len(a['tokens'])}), max |logprob diff| {diff:.2e}")


if __name__ == "__main__":
    main()
