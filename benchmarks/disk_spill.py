"""What the prefix cache's disk tier costs under load: the same concurrent requests with and without
--prefix-cache-dir (every committed block written through to disk; with --speculative-tokens the MTP pool too).

    .venv/bin/python benchmarks/disk_spill.py --model runs/tiny-coder/final --concurrency 8 --prompt-len 256 \\
        --max-tokens 32 --speculative-tokens 1

Each configuration runs twice on a fresh engine (the directory emptied first) and keeps the faster run. Prompts
are distinct (standard-library files), so every block is new and is written.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import torch

from selfseek import SamplingParams
from selfseek.engine.engine import EngineArgs, LLMEngine
from selfseek.weights import load_model

try:
    from spec_decode import stdlib_prompts
except ImportError:
    from benchmarks.spec_decode import stdlib_prompts


def run(model, tokenizer, prompts, max_tokens: int, k: int, cache_dir: str | None) -> tuple[float, dict]:
    engine = LLMEngine(model, tokenizer, EngineArgs(speculative_tokens=k, max_num_seqs=len(prompts),
                                                    kv_cache_memory=256 << 20, prefix_cache_dir=cache_dir))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    while engine.has_work():
        engine.step()
    return time.perf_counter() - t0, engine.stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--speculative-tokens", type=int, default=0)
    ap.add_argument("--dir", default=None, help="where to put the cache directory (default: the temp dir)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tokenizer = load_model(a.model, "float32", torch.device("cpu"), False, None, "none")
    prompts = stdlib_prompts(tokenizer, a.concurrency, a.prompt_len)
    run(model, tokenizer, prompts[:1], 2, a.speculative_tokens, None)  # warm-up
    for label, spill in (("RAM only", False), ("disk tier", True)):
        best = None
        for _ in range(2):
            d = tempfile.mkdtemp(dir=a.dir) if spill else None
            try:
                wall, stats = run(model, tokenizer, prompts, a.max_tokens, a.speculative_tokens, d)
            finally:
                if d:
                    shutil.rmtree(d)
            best = min(best or (wall, stats), (wall, stats), key=lambda r: r[0])
        wall, stats = best
        tokens = a.concurrency * (a.prompt_len + a.max_tokens)
        print(f"{label:>9}: {wall:.2f} s, {tokens / wall:.0f} tok/s (prompt + generated), "
              f"{stats.get('disk_writes', 0)} blocks written, {stats.get('disk_write_bytes', 0) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
