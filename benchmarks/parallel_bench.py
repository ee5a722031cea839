"""Tensor and expert parallelism on this machine: the medium V3 at TP=1, TP=2 and EP=2 (gloo ranks on loopback).

    .venv/bin/python benchmarks/parallel_bench.py                  # the safetensors folder and the Q8_0 GGUF
    .venv/bin/python benchmarks/parallel_bench.py --models /root/v3-871m/model-q8_0.gguf --layouts tp1,tp2 --json out

Every rank gets one intra-op thread (OMP_NUM_THREADS=1 for the spawned ranks, torch.set_num_threads(1) here), so
TP=1 is one core and TP=2 / EP=2 are two: on a 2-core machine this measures correctness and overhead, not scale.
Per (model, layout): load time and the weight bytes rank 0 holds; prefill tok/s (one prompt); decode tok/s of one
stream and at concurrency 8 (decode steps only, after every prompt is in); the bytes rank 0 sends per step in the
compute collectives (comm.py's counters: all-reduce, all-gather, all-to-all, gather; the lockstep's pickled
command broadcast is not counted); and how many greedy tokens agree with TP=1 of the same file (a random-weight
model: near-ties can flip late tokens when the ranks sum in another order).
The ranks of world size 2 are started once and reload each model (launch.reload_parallel).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from selfseek.bench import random_prompts
from selfseek.distributed import comm as comm_mod
from selfseek.distributed.parallel import Layout
from selfseek.sampling_params import SamplingParams

MODELS = ["/root/v3-871m", "/root/v3-871m/model-q8_0.gguf"]
LAYOUTS = {"tp1": Layout(), "tp2": Layout(tp=2), "ep2": Layout(ep=2)}


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights this rank keeps (parameters and quantized buffers; a tied matrix counted once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def run(engine, prompts: list[list[int]], out_len: int) -> dict:
    """Prompts in (prefill steps), then decode steps timed and their collective bytes counted on this rank."""
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"b{i}", p, params)
    tokens: dict[str, list[int]] = {f"b{i}": [] for i in range(len(prompts))}
    comm = comm_mod.current()
    t0 = time.perf_counter()
    while any(not t for t in tokens.values()):  # every prompt prefilled (its first token out)
        for d in engine.step():
            tokens[d.request_id].extend(d.token_ids)
    prefill_s = time.perf_counter() - t0
    prefill_sent = sum(comm.sent.values()) if comm is not None else 0.0
    if comm is not None:
        comm.reset_counters()
    steps, n_decoded, t1 = 0, 0, time.perf_counter()
    while engine.has_work():
        for d in engine.step():
            tokens[d.request_id].extend(d.token_ids)
            n_decoded += len(d.token_ids)
        steps += 1
    decode_s = time.perf_counter() - t1
    sent = dict(comm.sent) if comm is not None else {}
    return {"prefill_s": prefill_s, "prefill_sent": prefill_sent,
            "decode_tok_s": n_decoded / decode_s if decode_s else None, "steps": steps,
            "bytes_per_step": {k: v / max(1, steps) for k, v in sent.items()}, "tokens": tokens}


def measure(model, tokenizer, args) -> dict:
    from selfseek.engine.engine import EngineArgs, LLMEngine

    vocab = model.config.vocab_size

    def engine():
        return LLMEngine(model, tokenizer, EngineArgs(max_num_seqs=8, kv_cache_memory=args.kv_cache_memory))

    run(engine(), random_prompts(2, 16, vocab, seed=99), 3)  # warm-up: kernels chosen, pools made
    out: dict = {}
    comm = comm_mod.current()
    if comm is not None:
        comm.reset_counters()
    r = run(engine(), random_prompts(1, args.prefill_len, vocab, seed=1), 1)
    out["prefill_tok_s"] = args.prefill_len / r["prefill_s"]
    out["prefill_bytes_per_token"] = r["prefill_sent"] / args.prefill_len
    r1 = run(engine(), random_prompts(1, 32, vocab, seed=2), args.output_len)
    r8 = run(engine(), random_prompts(8, 32, vocab, seed=3), args.output_len // 2)
    out.update(decode1_tok_s=r1["decode_tok_s"], decode8_tok_s=r8["decode_tok_s"],
               decode1_bytes_per_step=r1["bytes_per_step"], decode8_bytes_per_step=r8["bytes_per_step"],
               tokens=[r1["tokens"], r8["tokens"]])
    return out


def agreement(got: list[dict], ref: list[dict]) -> str:
    """Greedy tokens equal to TP=1's, position by position up to the first difference of each stream."""
    same = total = 0
    for g, r in zip(got, ref, strict=True):
        for rid in r:
            total += len(r[rid])
            for a, b in zip(g[rid], r[rid], strict=True):
                if a != b:
                    break
                same += 1
    return f"{same}/{total}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated checkpoint folders / GGUF files")
    ap.add_argument("--layouts", default="tp1,tp2,ep2", help=f"comma-separated, of {', '.join(LAYOUTS)}")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=32, help="decode tokens of the one stream (c=8: half)")
    ap.add_argument("--kv-cache-memory", type=int, default=64 << 20)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    from selfseek.distributed.launch import close_parallel, load_parallel, reload_parallel
    from selfseek.weights import load_model

    os.environ["OMP_NUM_THREADS"] = "1"  # the spawned ranks inherit it: one thread per rank
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} on {os.cpu_count()} cores; "
          f"torch {torch.__version__}", flush=True)
    group = None
    rows, refs = [], {}
    try:
        for source in args.models.split(","):
            for name in args.layouts.split(","):
                layout = LAYOUTS[name]
                t0 = time.perf_counter()
                if layout.world == 1:
                    model, tok = load_model(source, args.dtype, "cpu", False)
                elif group is None:
                    model, tok = load_parallel(source, args.dtype, "cpu", False, tensor_parallel_size=layout.tp,
                                               expert_parallel_size=layout.ep)
                else:
                    model, tok = reload_parallel(group, source, args.dtype, None, layout)
                if layout.world > 1:
                    group = model
                load_s = time.perf_counter() - t0
                m = measure(model, tok, args)
                if name == "tp1":
                    refs[source] = m["tokens"]
                row = {"model": Path(source).name, "layout": name, "load_s": load_s, "rank0_weight_gb":
                       held_bytes(model) / 1e9, "load_avg": os.getloadavg()[0],
                       "same_tokens_as_tp1": agreement(m.pop("tokens"), refs[source]) if source in refs else "-",
                       **m}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if layout.world == 1:
                    del model
    finally:
        if group is not None:
            close_parallel(group)
    print()
    print("| model | layout | load s | rank-0 weights GB | prefill tok/s | decode tok/s c=1 | decode tok/s c=8 | "
          "bytes/step c=1 | bytes/step c=8 | bytes/prefill token | tokens = TP=1 | load avg |")
    print("|" + "---|" * 12)
    for r in rows:
        b1, b8 = (sum(r[k].values()) for k in ("decode1_bytes_per_step", "decode8_bytes_per_step"))
        print(f"| {r['model']} | {r['layout']} | {r['load_s']:.1f} | {r['rank0_weight_gb']:.2f} | "
              f"{r['prefill_tok_s']:.0f} | {r['decode1_tok_s']:.2f} | {r['decode8_tok_s']:.2f} | {b1 / 1e3:.1f} kB | "
              f"{b8 / 1e3:.1f} kB | {r['prefill_bytes_per_token'] / 1e3:.1f} kB | {r['same_tokens_as_tp1']} | "
              f"{r['load_avg']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
