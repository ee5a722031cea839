"""TTFT and throughput of `selfseek serve` under N concurrent streaming chat requests.

    .venv/bin/python benchmarks/serve_latency.py                      # starts the default model here
    .venv/bin/python benchmarks/serve_latency.py --url http://127.0.0.1:8000 --model smollm2

Each request has its own prompt (a shared one would measure the prefix cache, not the engine) and
generates exactly --max-tokens tokens (ignore_eos), streamed over SSE. Reported per concurrency level:
TTFT p50/p90 (request sent -> first token chunk), inter-token latency p50, and aggregate output tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time

import httpx


async def one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            delta = event["choices"][0]["delta"] if event.get("choices") else {}
            if delta.get("content") or delta.get("reasoning_content"):
                stamps.append(time.perf_counter())
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"ttft": stamps[0] - start if stamps else float("nan"), "itl": gaps, "tokens": tokens,
            "e2e": time.perf_counter() - start}


async def level(url: str, model: str, concurrency: int, max_tokens: int, headers: dict) -> dict:
    prompts = [f"Request {i} of {concurrency}, seed {time.time_ns() % 100000}: write a short story about "
               f"the number {i * 7 + concurrency}." for i in range(concurrency)]
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, model, p, max_tokens) for p in prompts))
        wall = time.perf_counter() - start
    ttfts = sorted(r["ttft"] for r in results)
    itl = [g for r in results for g in r["itl"]]
    total = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "ttft_p50_s": statistics.median(ttfts),
            "ttft_p90_s": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
            "itl_p50_ms": 1000 * statistics.median(itl) if itl else float("nan"),
            "output_tok_per_s": total / wall, "tokens": total, "wall_s": wall}


def start_local(model: str | None, device: str | None, dtype: str) -> tuple[str, str, callable]:
    import uvicorn

    from selfseek.server import build_service, create_app

    svc = build_service(model, dtype, device)
    server = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        svc.engine.shutdown()

    return f"http://127.0.0.1:{port}", svc.model_id, stop


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="a running server (default: start one here)")
    p.add_argument("--model", default=None, help="model to start, or the name to ask a --url server for")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--api-key", default=None)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    stop = None
    if args.url is None:
        url, model, stop = start_local(args.model, args.device, args.dtype)
    else:
        url, model = args.url.rstrip("/"), args.model
        if model is None:
            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        asyncio.run(level(url, model, 1, 4, headers))  # warm-up
        for c in args.concurrency:
            print(json.dumps(asyncio.run(level(url, model, c, args.max_tokens, headers))), flush=True)
    finally:
        if stop is not None:
            stop()


if __name__ == "__main__":
    main()
