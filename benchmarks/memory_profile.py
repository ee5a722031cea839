"""Where the resident memory of serving a model goes: peak RSS (VmHWM) stage by stage.

    .venv/bin/python benchmarks/memory_profile.py                 # default model, in this process
    .venv/bin/python benchmarks/memory_profile.py --serve         # a real `selfseek serve`, measured from outside

In-process stages: imports, weights loaded (bytes by storage kind), engine built (KV pool reserved vs touched),
first short request, one prompt of --prompt-len tokens. `--serve` starts `selfseek serve` on a free port,
sends one chat request and one long-prompt request, and reads the server's /proc/<pid>/status.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

MiB = 1 << 20


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _row(stage: str, before: dict[str, int], after: dict[str, int], note: str = "") -> dict:
    row = {"stage": stage, "rss_mib": after["VmRSS"] / MiB, "peak_mib": after["VmHWM"] / MiB,
           "rss_delta_mib": (after["VmRSS"] - before["VmRSS"]) / MiB,
           "peak_delta_mib": (after["VmHWM"] - before["VmHWM"]) / MiB, "note": note}
    print(f"{stage:34s} RSS {row['rss_mib']:7.0f} MiB ({row['rss_delta_mib']:+6.0f})  peak {row['peak_mib']:7.0f} MiB "
          f"({row['peak_delta_mib']:+6.0f})  anon {after['RssAnon'] / MiB:.0f} file {after['RssFile'] / MiB:.0f}  "
          f"{note}", flush=True)
    return row


def weight_bytes(model) -> dict[str, int]:
    """Resident bytes of the model's parameters and buffers, by dtype (packed quantized blocks are uint8/int8)."""
    import torch

    by: dict[str, int] = {}
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # tied embeddings share one storage
            continue
        seen.add(ptr)
        key = str(t.dtype).removeprefix("torch.")
        by[key] = by.get(key, 0) + t.untyped_storage().nbytes()
    return by


def in_process(args) -> list[dict]:
    rows = []
    s0 = proc_status()
    import torch

    from selfseek.engine.engine import EngineArgs, LLMEngine
    from selfseek.sampling_params import SamplingParams
    from selfseek.weights import load_model

    torch.set_num_threads(args.threads)
    s1 = proc_status()
    rows.append(_row("python + torch + selfseek imports", s0, s1))
    model, tokenizer = load_model(args.model, args.dtype, "cpu", progress=False)
    s2 = proc_status()
    wb = weight_bytes(model)
    rows.append(_row("weights + tokenizer loaded", s1, s2,
                     "params/buffers: " + ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in sorted(wb.items()))))
    engine_args = json.loads(args.engine_args) if args.engine_args else {}
    engine = LLMEngine(model, tokenizer, EngineArgs(**engine_args))
    s3 = proc_status()
    pool = sum(p.untyped_storage().nbytes() for p in engine.runner.pools)
    rows.append(_row("engine built (KV pool)", s2, s3,
                     f"pool reserved {pool / MiB:.0f} MiB = {engine.blocks.num_blocks} blocks x "
                     f"{engine.blocks.block_size} tok x {engine.kv_bytes_per_token} B"))

    def run(prompt_ids: list[int], n: int) -> None:
        engine.add_request(f"r{time.monotonic_ns()}", prompt_ids, SamplingParams(temperature=0, max_tokens=n))
        while engine.has_work():
            engine.step()

    hello = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}],
                                                           add_generation_prompt=True), add_special_tokens=False)
    run(hello, 32)
    s4 = proc_status()
    rows.append(_row("first request (chat, 32 new tokens)", s3, s4))
    g = torch.Generator().manual_seed(0)
    long = torch.randint(100, model.config.vocab_size - 100, (args.prompt_len,), generator=g).tolist()
    run(long, 32)
    s5 = proc_status()
    rows.append(_row(f"{args.prompt_len}-token prompt, 32 new tokens", s4, s5))
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(args) -> list[dict]:
    import httpx

    port = _free_port()
    cli = "from selfseek.cli import main; raise SystemExit(main())"
    cmd = [sys.executable, "-c", cli, "serve", *([args.model] if args.model else []), "--port", str(port),
           *args.serve_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rows = []
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not become healthy in 600 s")
            time.sleep(0.5)
        s0 = {"VmRSS": 0, "VmHWM": 0, "RssAnon": 0, "RssFile": 0}
        s1 = proc_status(proc.pid)
        rows.append(_row("serve: ready (/health)", s0, s1))
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]

        def chat(content: str) -> None:
            r = httpx.post(f"{url}/v1/chat/completions", timeout=600, json={
                "model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 32,
                "temperature": 0})
            r.raise_for_status()

        chat("Hello!")
        s2 = proc_status(proc.pid)
        rows.append(_row("serve: first request", s1, s2))
        words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
        chat(" ".join(words[i % len(words)] + str(i) for i in range(args.prompt_len // 3)))
        s3 = proc_status(proc.pid)
        rows.append(_row(f"serve: ~{args.prompt_len}-token prompt", s2, s3))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the default model (smollm2)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--engine-args", default=None, help='JSON EngineArgs fields, e.g. \'{"max_num_seqs": 8}\'')
    p.add_argument("--serve", action="store_true", help="measure a real `selfseek serve` process instead")
    p.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="extra `selfseek serve` arguments")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = serve(args) if args.serve else in_process(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
