"""MTP speculative decoding: acceptance per draft position, tokens per step and generation speed at each
number of draft tokens k (0: off), greedy and sampled, on one model and the same prompts.

    .venv/bin/python benchmarks/spec_decode.py --model runs/tiny-coder/final --k 0,1,2 --temperature 0,1 \\
        --prompts 8 --prompt-len 48 --max-tokens 48 --json /tmp/spec.json

Prompts are the first --prompt-len tokens of Python standard-library files (what `selfseek train`'s quick
start trains on; a random checkpoint's MTP head accepts almost nothing, so give it a trained one). All
prompts run at once (continuous batching); tok/s counts generated tokens over the whole run, prefill included.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sysconfig
import time
from pathlib import Path

import torch

from selfseek import SamplingParams
from selfseek.engine.engine import EngineArgs, LLMEngine
from selfseek.weights import load_model


def stdlib_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens from standard-library files, picked by a stable hash of their names."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"),
                   key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    out = []
    for path in files:
        ids = tokenizer.encode(path.read_text(errors="replace")[: 20 * length])
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            break
    return out


def run(model, tokenizer, prompts: list[list[int]], k: int, temperature: float, max_tokens: int, seed: int) -> dict:
    engine = LLMEngine(model, tokenizer, EngineArgs(speculative_tokens=k, max_num_seqs=len(prompts),
                                                    kv_cache_memory=64 << 20, enable_prefix_caching=False))
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True)
    engine.add_request("warm-up", prompts[0][:8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while engine.has_work():
        engine.step()
    steps0, generated0 = engine.timings["steps"], engine.counters["generation_tokens"]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    while engine.has_work():
        engine.step()
    wall = time.perf_counter() - t0
    s = engine.stats()
    generated = s["generation_tokens"] - generated0
    return {"k": k, "temperature": temperature, "generated": generated, "seconds": round(wall, 3),
            "tok_s": round(generated / wall, 2), "steps": engine.timings["steps"] - steps0,
            "acceptance": round(s.get("spec_acceptance_rate", 0.0), 4),
            "acceptance_per_position": [round(a, 4) for a in s.get("spec_acceptance_rate_per_position", [])],
            "tokens_per_step": round(s.get("spec_tokens_per_step", 1.0), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a checkpoint with its MTP layer (V3-shaped)")
    ap.add_argument("--k", default="0,1,2", help="draft tokens per step, comma-separated (0: no speculation)")
    ap.add_argument("--temperature", default="0,1", help="comma-separated")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the rows here too")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tokenizer = load_model(a.model, "float32", torch.device("cpu"), False, None, "none")
    prompts = stdlib_prompts(tokenizer, a.prompts, a.prompt_len)
    rows = [run(model, tokenizer, prompts, k, t, a.max_tokens, a.seed)
            for t in (float(x) for x in a.temperature.split(",")) for k in (int(x) for x in a.k.split(","))]
    print(f"{'k':>2} {'temp':>5} {'tok/s':>7} {'steps':>6} {'tok/step':>8} {'accept':>7}  per position")
    for r in rows:
        print(f"{r['k']:>2} {r['temperature']:>5} {r['tok_s']:>7} {r['steps']:>6} {r['tokens_per_step']:>8} "
              f"{r['acceptance']:>7}  {r['acceptance_per_position']}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
