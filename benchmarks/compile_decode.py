"""Does torch.compile of the model forward win for decode on this CPU? Eager vs compiled, through the engine.

    .venv/bin/python benchmarks/compile_decode.py                       # default model, batch 1 and 8
    .venv/bin/python benchmarks/compile_decode.py --model /root/v3-871m/model-q8_0.gguf --batch 1,16

For each batch size B (a fixed bucket: B requests decoding together), runs B requests of --prompt-len
tokens for --steps decode steps with the model's forward eager, then compiled (torch.compile of
`model.hidden_states`, default mode, dynamic shapes), and reports the compile time (first steps) and the
steady decode step time (median over a second run in which eager and compiled steps alternate, so load
changes on a shared machine hit both alike). Greedy tokens are compared between the two.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from selfseek.engine.engine import EngineArgs, LLMEngine
from selfseek.sampling_params import SamplingParams
from selfseek.weights import load_model


def decode_steps(engine: LLMEngine, model, forwards: list, batch: int, prompt_len: int, steps: int,
                 vocab: int) -> tuple[dict[int, list[float]], list]:
    """Run `batch` requests; once every prompt is prefilled, decode step i uses forwards[i % len(forwards)].
    -> (step times per forward index, the tokens produced)."""
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(100, vocab - 100, (batch, prompt_len), generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"c-{i}-{time.monotonic_ns()}", p, params)
    times: dict[int, list[float]] = {i: [] for i in range(len(forwards))}
    tokens, started, step = [], set(), 0
    while engine.has_work():
        decoding = len(started) == batch  # every prompt prefilled: a pure decode step
        which = step % len(forwards) if decoding else 0
        model.hidden_states = forwards[which]
        t0 = time.perf_counter()
        deltas = engine.step()
        if decoding:
            times[which].append(time.perf_counter() - t0)
            step += 1
        started.update(d.request_id for d in deltas if d.token_ids)
        tokens.extend((d.request_id.split("-")[1], tuple(d.token_ids)) for d in deltas)
    return times, sorted(tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--mode", default=None, help="torch.compile mode (default; reduce-overhead, ...)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, args.dtype, "cpu", progress=False)
    vocab = model.config.vocab_size
    eager = model.hidden_states
    try:
        for b in args.batch:
            engine = LLMEngine(model, tokenizer, EngineArgs(max_num_seqs=b))
            decode_steps(engine, model, [eager], b, 16, 4, vocab)  # warm the eager path
            compiled = torch.compile(eager, mode=args.mode, dynamic=True)
            t0 = time.perf_counter()
            _, compiled_tokens = decode_steps(engine, model, [compiled], b, args.prompt_len, args.steps, vocab)
            compile_s = time.perf_counter() - t0  # compiles (and recompiles) as shapes vary, then runs
            _, eager_tokens = decode_steps(engine, model, [eager], b, args.prompt_len, args.steps, vocab)
            # paired: eager and compiled steps alternate, so a changing machine load hits both alike
            times, _ = decode_steps(engine, model, [eager, compiled], b, args.prompt_len, 2 * args.steps, vocab)
            e, c = statistics.median(times[0]), statistics.median(times[1])
            same = [t for _, t in eager_tokens] == [t for _, t in compiled_tokens]
            print(f"batch {b:3d}: eager step {e * 1e3:7.1f} ms | compiled step {c * 1e3:7.1f} ms (speed-up "
                  f"{e / c:.2f}x) | first compiled run ({args.steps} steps, compiling) {compile_s:.1f} s | "
                  f"same greedy tokens: {same}", flush=True)
    finally:
        model.hidden_states = eager


if __name__ == "__main__":
    main()
