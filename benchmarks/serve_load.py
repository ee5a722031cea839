"""Load, disconnect, fault and fuzz figures of `selfseek serve` (issue 11), against a server started here.

    .venv/bin/python benchmarks/serve_load.py                                   # the default model, full run
    .venv/bin/python benchmarks/serve_load.py --streams 16 --seconds 30 --disconnects 100 --fuzz-examples 30

The server runs in this process (uvicorn on 127.0.0.1, a free port), so faults can be injected into the engine
and its block pool read directly. Phases, each reported as one JSON object:

- streams: N clients each send streaming chat requests back to back for T seconds (ignore_eos, a random
  max_tokens): every answer must end with finish_reason "length", exactly max_tokens tokens and [DONE]; counts
  of lost/truncated answers and 5xx, TTFT and inter-token latency p50/p99, and KV blocks in use afterwards.
- disconnects: K streaming requests (16 at a time) dropped after a random number of events; the pool must
  return to empty.
- faults: requests whose step raises (a logits processor that throws), whose grammar fails mid-answer, and
  whose preparation raises, each among bystander streams: only the faulty request fails, and its body never
  holds the exception text.
- fuzz: schemathesis against /openapi.json (every POST route): 0 server errors, responses as documented.

Exit status 1 when any phase misses its bar, so CI can run the short version (tests/test_server_trust.py).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

FAULT_SEED = 424242  # requests with this seed get the injected fault


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Server:
    """uvicorn serving the app in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def pool(svc) -> dict:
    s = svc.engine.stats()
    return {"kv_blocks_used": s.get("kv_blocks_used", 0), "running": s.get("running", 0),
            "waiting": s.get("waiting", 0)}


def wait_idle(svc, timeout: float = 60.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = pool(svc)
        if not any(p.values()):
            return p
        time.sleep(0.05)
    return pool(svc)


# Idle pooled connections expire before uvicorn's 5 s keep-alive timeout closes them: otherwise a request sent
# on a connection the server is closing at that moment fails with ReadError (a client race, not a server fault).
LIMITS = httpx.Limits(keepalive_expiry=2.0)


async def stream(client: httpx.AsyncClient, body: dict, drop_after: int | None = None) -> dict:
    """One streaming chat request; drop_after: close the connection after that many events."""
    start = time.perf_counter()
    out = {"status": None, "done": False, "finish": None, "tokens": None, "error": None, "stamps": [], "body": ""}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            out["body"] = (await r.aread()).decode(errors="replace")
            return out
        events = 0
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                out["done"] = True
                continue
            if not line.startswith("data: {"):
                continue
            events += 1
            event = json.loads(line[6:])
            if "error" in event:
                out["error"] = event["error"]
                out["body"] += line
                continue
            for c in event.get("choices") or []:
                if c["delta"].get("content") or c["delta"].get("reasoning_content"):
                    out["stamps"].append(time.perf_counter() - start)
                out["finish"] = c.get("finish_reason") or out["finish"]
            if event.get("usage"):
                out["tokens"] = event["usage"]["completion_tokens"]
            if drop_after is not None and events >= drop_after:
                return out  # leaving the block closes the connection mid-stream
    return out


def chat_body(model: str, i: int, max_tokens: int, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": f"Request {i}: tell me about the number {i}."}],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.8, "seed": i, "stream": True, **extra}


async def phase_streams(svc, url: str, model: str, headers: dict, n: int, seconds: float, max_tokens: int) -> dict:
    results: list[tuple[dict, int]] = []
    stop_at = time.perf_counter() + seconds

    async def client_loop(k: int) -> None:
        rng = random.Random(k)
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=LIMITS) as client:
            i = 0
            while time.perf_counter() < stop_at:
                m = rng.randint(max(1, max_tokens // 4), max_tokens)
                results.append((await stream(client, chat_body(model, k * 100_000 + i, m)), m))
                i += 1

    start = time.perf_counter()
    await asyncio.gather(*(client_loop(k) for k in range(n)))
    wall = time.perf_counter() - start
    ok = [r for r, m in results if r["status"] == 200 and r["done"] and r["finish"] == "length" and r["tokens"] == m
          and not r["error"]]
    ttft = [r["stamps"][0] for r in ok if r["stamps"]]
    itl = [b - a for r in ok for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)]
    tokens = sum(r["tokens"] for r in ok)
    return {"phase": "streams", "clients": n, "seconds": round(wall, 1), "answers": len(results),
            "lost_or_truncated": len(results) - len(ok),
            "http_5xx": sum(1 for r, _ in results if (r["status"] or 0) >= 500),
            "ttft_p50_s": round(percentile(ttft, 0.5), 3), "ttft_p99_s": round(percentile(ttft, 0.99), 3),
            "itl_p50_ms": round(1000 * percentile(itl, 0.5), 1), "itl_p99_ms": round(1000 * percentile(itl, 0.99), 1),
            "output_tokens_per_s": round(tokens / wall, 1), "after": wait_idle(svc)}


async def phase_disconnects(svc, url: str, model: str, headers: dict, k: int, max_tokens: int) -> dict:
    rng = random.Random(7)
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> dict:
        async with sem, httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=LIMITS) as client:
            return await stream(client, chat_body(model, i, max_tokens), drop_after=rng.randint(0, 12))

    results = await asyncio.gather(*(one(i) for i in range(k)))
    after = wait_idle(svc)
    return {"phase": "disconnects", "dropped": k, "http_5xx": sum(1 for r in results if (r["status"] or 0) >= 500),
            "after": after, "leaked_blocks": after["kv_blocks_used"]}


def install_faults(svc, kind: str):
    """Make requests with FAULT_SEED fail in the engine step ("step"), in their grammar ("grammar"), or in
    their preparation ("prep"). Returns an undo callable."""
    from selfseek.server.structured import GrammarFailed

    if kind == "prep":
        original = svc.sampling_params

        def broken_prep(names=None, **fields):
            if fields.get("seed") == FAULT_SEED:
                raise RuntimeError("injected preparation fault: secret-text")
            return original(names, **fields)

        svc.sampling_params = broken_prep
        return lambda: setattr(svc, "sampling_params", original)

    original_add = svc.engine.add_request

    def add(request_id, prompt, params):
        if params.seed == FAULT_SEED:
            def boom(ids, logits):
                if len(ids) >= 3:
                    if kind == "grammar":
                        raise GrammarFailed("injected grammar fault: secret-text")
                    raise RuntimeError("injected step fault: secret-text")
                return logits
            params = dataclasses.replace(params, logits_processors=[*params.logits_processors, boom])
        return original_add(request_id, prompt, params)

    svc.engine.add_request = add
    return lambda: setattr(svc.engine, "add_request", original_add)


async def phase_faults(svc, url: str, model: str, headers: dict, bystanders: int, max_tokens: int) -> dict:
    out = {"phase": "faults", "cases": {}}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=LIMITS) as client:
        for kind in ("step", "grammar", "prep"):
            undo = install_faults(svc, kind)
            try:
                good = [stream(client, chat_body(model, 1000 + i, max_tokens)) for i in range(bystanders)]
                bad = stream(client, {**chat_body(model, 0, max_tokens), "seed": FAULT_SEED})
                results = await asyncio.gather(bad, *good)
            finally:
                undo()
            faulty, rest = results[0], results[1:]
            failed_alone = (faulty["error"] is not None or (faulty["status"] or 0) >= 500) and all(
                r["status"] == 200 and r["done"] and r["finish"] == "length" and not r["error"] for r in rest)
            out["cases"][kind] = {"faulty_failed": faulty["error"] is not None or (faulty["status"] or 0) >= 500,
                                  "bystanders_ok": sum(1 for r in rest if r["done"] and not r["error"]),
                                  "bystanders": len(rest), "only_affected_failed": failed_alone,
                                  "leaks_text": "secret-text" in faulty["body"]}
    out["after"] = wait_idle(svc)
    healthy = (await asyncio.to_thread(httpx.get, url + "/health")).status_code
    out["health_after"] = healthy
    return out


def server_errors(svc) -> int:
    """5xx answers so far, from the server's own request_errors counter (what a client saw, by status)."""
    total = 0
    for metric in svc.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name.endswith("request_errors_total") and sample.labels.get("status", "").startswith("5"):
                total += int(sample.value)
    return total


def phase_fuzz(svc, url: str, key: str | None, examples: int, workers: int, context: int, timeout: float,
               st_phases: str) -> dict:
    """schemathesis over every POST route. The served context is cut to `context` tokens meanwhile, so a
    generated max_tokens (clipped to the context) keeps each case short: the fuzzer tests the edges, not speed."""
    exe = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    if not Path(exe).exists():
        return {"phase": "fuzz", "skipped": "schemathesis is not installed (pip install selfseek[test])"}
    cmd = [exe, "run", f"{url}/openapi.json", "--checks",
           "not_a_server_error,status_code_conformance,response_schema_conformance",
           "--max-examples", str(examples), "--workers", str(workers), "--seed", "1",
           "--request-timeout", "120", "--include-method", "POST", "--suppress-health-check", "all",
           "--phases", st_phases]
    if key:
        cmd += ["-H", f"Authorization: Bearer {key}"]
    start = time.perf_counter()
    before = server_errors(svc)
    full, svc.max_model_len = svc.max_model_len, min(svc.max_model_len, context)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        parts = [p.decode(errors="replace") if isinstance(p, bytes) else p or "" for p in (e.stdout, e.stderr)]
        out = "".join(parts) + f"\n(stopped after {timeout} s)"
    finally:
        svc.max_model_len = full
    Path("/tmp/selfseek-fuzz-last.txt").write_text(out)  # the full schemathesis report
    generated = re.search(r"(\d+) generated", out)
    failures = {m.group(1): int(m.group(3)) for m in re.finditer(r"❌ (ST\d+|[A-Z]\w+) ([^:\n]+): (\d+)", out)}
    errors = re.search(r"Runtime Error: (\d+)", out)
    return {"phase": "fuzz", "seconds": round(time.perf_counter() - start, 1),
            "cases": int(generated.group(1)) if generated else 0, "http_5xx": server_errors(svc) - before,
            "check_failures": failures, "fuzzer_errors": int(errors.group(1)) if errors else 0,
            "report": "/tmp/selfseek-fuzz-last.txt"}


def verdict(results: list[dict]) -> list[str]:
    bad = []
    for r in results:
        if r["phase"] == "streams" and (r["lost_or_truncated"] or r["http_5xx"] or r["after"]["kv_blocks_used"]):
            bad.append("streams")
        if r["phase"] == "disconnects" and (r["leaked_blocks"] or r["http_5xx"]):
            bad.append("disconnects")
        if r["phase"] == "faults" and (any(not c["only_affected_failed"] or c["leaks_text"]
                                           for c in r["cases"].values()) or r["health_after"] != 200):
            bad.append("faults")
        if r["phase"] == "fuzz" and "skipped" not in r and (r["http_5xx"] or sum(r["check_failures"].values())
                                                             or not r["cases"]):
            bad.append("fuzz")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder or .gguf (default: the default model)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--disconnects", type=int, default=1000)
    ap.add_argument("--bystanders", type=int, default=8)
    ap.add_argument("--fuzz-examples", type=int, default=100, help="schemathesis examples per operation (0: skip)")
    ap.add_argument("--fuzz-workers", type=int, default=2)
    ap.add_argument("--fuzz-context", type=int, default=96, help="context (tokens) served while fuzzing")
    ap.add_argument("--fuzz-timeout", type=float, default=1800)
    ap.add_argument("--fuzz-phases", default="examples,coverage,fuzzing",
                    help="schemathesis phases (coverage: boundary values of every field; the slowest)")
    ap.add_argument("--phases", default="streams,disconnects,faults,fuzz")
    ap.add_argument("--kv-cache-memory", type=int, default=256 << 20)
    ap.add_argument("--max-model-len", type=int, default=1024)
    args = ap.parse_args(argv)

    from selfseek.server import build_service, create_app

    key = "sk-load"
    svc = build_service(args.model, args.dtype, "cpu", "load", {"kv_cache_memory": args.kv_cache_memory,
                                                                 "max_model_len": args.max_model_len},
                        api_key=key, keep_alive_interval=5)
    svc.warm_up(grammar=True)
    server = Server(create_app(svc))
    headers = {"Authorization": f"Bearer {key}"}
    phases = args.phases.split(",")
    results = []
    try:
        if "streams" in phases:
            results.append(asyncio.run(phase_streams(svc, server.url, "load", headers, args.streams, args.seconds,
                                                     args.max_tokens)))
            print(json.dumps(results[-1]), flush=True)
        if "disconnects" in phases:
            results.append(asyncio.run(phase_disconnects(svc, server.url, "load", headers, args.disconnects,
                                                         args.max_tokens * 4)))
            print(json.dumps(results[-1]), flush=True)
        if "faults" in phases:
            results.append(asyncio.run(phase_faults(svc, server.url, "load", headers, args.bystanders,
                                                    args.max_tokens)))
            print(json.dumps(results[-1]), flush=True)
        if "fuzz" in phases and args.fuzz_examples:
            results.append(phase_fuzz(svc, server.url, key, args.fuzz_examples, args.fuzz_workers, args.fuzz_context,
                                      args.fuzz_timeout, args.fuzz_phases))
            results[-1]["after"] = wait_idle(svc)
            print(json.dumps(results[-1]), flush=True)
    finally:
        server.stop()
        svc.engine.shutdown()
    bad = verdict(results)
    print(json.dumps({"failed_phases": bad}), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
