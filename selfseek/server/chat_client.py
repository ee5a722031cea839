"""`selfseek chat`: a multi-turn terminal chat over the server's streaming API; reasoning is shown dimmed.

Commands: /reset clears the conversation (the system prompt stays), /exit (or Ctrl-D) quits; Ctrl-C stops
the answer being written. Without --url it starts a server for MODEL in-process on a free local port.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import httpx

HELP = "Type a message. /reset starts over, /exit quits, Ctrl-C stops an answer."


def stream_chat(client: httpx.Client, model: str, messages: list[dict], max_tokens: int | None,
                temperature: float | None, thinking: bool | None) -> Iterator[tuple[str, str]]:
    """(reasoning, content) pieces of one streamed answer."""
    body: dict = {"model": model, "messages": messages, "stream": True}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    if thinking is not None:
        body["thinking"] = {"type": "enabled" if thinking else "disabled"}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(_error_text(r))
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"].get("message", "error"))
            for choice in event.get("choices", []):
                delta = choice.get("delta", {})
                yield delta.get("reasoning_content") or "", delta.get("content") or ""


def _error_text(r: httpx.Response) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {r.status_code}"


def run_chat(url: str, api_key: str | None = None, model: str | None = None, system: str | None = None,
             thinking: bool | None = None, max_tokens: int | None = None, temperature: float | None = None,
             read: Callable[[str], str] = input, console=None) -> int:
    from rich.console import Console

    console = console or Console(highlight=False)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(600.0, connect=10.0)) as client:
        if model is None:
            r = client.get("/v1/models")
            if r.status_code != 200:
                console.print(f"selfseek chat: {_error_text(r)}", markup=False)
                return 1
            model = r.json()["data"][0]["id"]
        console.print(f"[bold]{model}[/bold] at {url}. {HELP}")
        start = [{"role": "system", "content": system}] if system else []
        messages = list(start)
        while True:
            try:
                line = read(">>> ")
            except (EOFError, KeyboardInterrupt):
                console.print()
                return 0
            text = line.strip()
            if text in ("/exit", "/quit", "/bye"):
                return 0
            if text == "/reset":
                messages = list(start)
                console.print("[dim](new conversation)[/dim]")
                continue
            if not text:
                continue
            messages.append({"role": "user", "content": line})
            answer, in_reasoning = "", False
            try:
                for reasoning, content in stream_chat(client, model, messages, max_tokens, temperature, thinking):
                    if reasoning:
                        console.print(reasoning, style="dim", end="", markup=False)
                        in_reasoning = True
                    if content:
                        if in_reasoning:
                            console.print("\n")
                            in_reasoning = False
                        console.print(content, end="", markup=False)
                        answer += content
            except KeyboardInterrupt:
                console.print("[dim](stopped)[/dim]", end="")
            except (RuntimeError, httpx.HTTPError) as e:
                console.print(f"\nerror: {e}", markup=False)
                messages.pop()
                continue
            console.print()
            messages.append({"role": "assistant", "content": answer})


def chat_with_local_model(args) -> int:
    """Serve MODEL on a free 127.0.0.1 port in this process, then chat with it."""
    import socket
    import threading
    import time

    import uvicorn

    from selfseek.server.app import build_service, create_app

    svc = build_service(args.model, args.dtype, args.device)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.05)
    try:
        return run_chat(f"http://127.0.0.1:{port}", None, svc.model_id, args.system, args.think, args.max_tokens,
                        args.temperature)
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        svc.engine.shutdown()
