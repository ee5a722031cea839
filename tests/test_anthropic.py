"""DeepSeek's Anthropic-format API (/anthropic/v1/messages, /v1/messages) with the real `anthropic` SDK.

The server runs the tiny V3.1-shaped model of test_server.py (a real DeepSeek tokenizer and template:
thinking, V3.1 tool calls), so every answer is checked against the same request sent to
/v1/chat/completions: the Anthropic route must say what the chat route says, in Anthropic's shapes (parsed
by the SDK into its own types). A random model never closes its reasoning by itself, so the thinking ->
text -> tool_use block transitions are driven through the route's real stream encoder by engine deltas
written here (test_stream_blocks_from_engine_deltas). The default model answers through the SDK in a
slow test.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pydantic
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
anthropic = pytest.importorskip("anthropic")
httpx = pytest.importorskip("httpx")

from server_helpers import LiveServer, build_tiny_checkpoint  # noqa: E402

from selfseek.engine.async_engine import RequestDelta  # noqa: E402
from selfseek.server import build_service, create_app  # noqa: E402
from selfseek.server.anthropic import _stream  # noqa: E402
from selfseek.server.openai import ChatChoice  # noqa: E402
from selfseek.server.reasoning import ReasoningParser  # noqa: E402
from selfseek.server.stream import Generation  # noqa: E402
from selfseek.server.tools import FORMATS  # noqa: E402

KEY = "sk-anthropic-test"
ENGINE = {"kv_cache_memory": 48 << 20, "max_model_len": 512, "block_size": 16}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"name": "get_weather", "description": "Weather for a city.", "input_schema": WEATHER}]
OPENAI_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                                  "parameters": WEATHER}}]
EVENT = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)
GREEDY = {"temperature": 0}  # the SDK has no temperature argument any more; DeepSeek's API still takes it
SYSTEM = "Be brief: answer in one short sentence, and never repeat the question back to the user."  # > 1 KV block


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny", "deepseek-v3.1", family="deepseek_v3")
    svc = build_service(str(folder), "float32", "cpu", "tiny", ENGINE, api_key=KEY, keep_alive_interval=0.5)
    server = LiveServer(create_app(svc))
    yield server, svc
    server.stop()
    svc.engine.shutdown()


def client(server, **kwargs) -> anthropic.Anthropic:
    """The SDK pointed at DeepSeek's base path; it sends the key as x-api-key."""
    return anthropic.Anthropic(base_url=server.url + "/anthropic", max_retries=0, **({"api_key": KEY} | kwargs))


def chat(server, body: dict) -> dict:
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def raw_events(server, body: dict) -> list[tuple[str, dict]]:
    """(event name, data) of a streamed response, as the bytes say."""
    with httpx.stream("POST", server.url + "/v1/messages", json={**body, "stream": True},
                      headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if lines:
            assert lines[0].startswith("event: ") and lines[1].startswith("data: ") and len(lines) == 2, block
            events.append((lines[0][len("event: "):], json.loads(lines[1][len("data: "):])))
    return events


def check_sequence(events: list[tuple[str, dict]]) -> list[str]:
    """Anthropic's order: message_start, blocks (start, deltas, stop) with increasing indexes, message_delta,
    message_stop; pings only after message_start. Every event validates as the SDK's own type (pydantic,
    not the SDK's lenient parse). Returns the block types."""
    names = [name for name, _ in events]
    assert all(name == data["type"] for name, data in events)
    for name, data in events:
        if name != "ping":
            EVENT.validate_python(data)
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    body = [e for e in events[1:-2] if e[0] != "ping"]
    types, open_index = [], None
    for name, data in body:
        if name == "content_block_start":
            assert open_index is None and data["index"] == len(types)
            open_index = data["index"]
            types.append(data["content_block"]["type"])
        elif name == "content_block_delta":
            assert data["index"] == open_index
            kind = {"thinking": "thinking_delta", "text": "text_delta", "tool_use": "input_json_delta"}[types[-1]]
            assert data["delta"]["type"] == kind
        else:
            assert name == "content_block_stop" and data["index"] == open_index
            open_index = None
    assert open_index is None
    return types


# ---- text, streaming, usage -------------------------------------------------------------------------------


def test_text_matches_chat_completions(tiny):
    server, _ = tiny
    messages = [{"role": "system", "content": SYSTEM}, *user("Hello there")]
    want = chat(server, {"model": "tiny", "messages": messages, "max_tokens": 10, **GREEDY})
    text = want["choices"][0]["message"]["content"]
    stop = {"length": "max_tokens", "stop": "end_turn"}[want["choices"][0]["finish_reason"]]

    # an unknown (Anthropic) model name runs the served model, and is echoed back
    r = client(server).messages.create(model="claude-some-model", system=SYSTEM, messages=user("Hello there"),
                                       max_tokens=10, extra_body=GREEDY)
    assert isinstance(r, anthropic.types.Message) and r.id.startswith("msg_") and r.model == "claude-some-model"
    assert [(b.type, b.text) for b in r.content] == [("text", text)]
    assert r.stop_reason == stop and r.stop_sequence is None
    u = r.usage
    assert u.input_tokens + u.cache_read_input_tokens == want["usage"]["prompt_tokens"]
    assert u.cache_read_input_tokens > 0  # the chat request just cached this prompt
    assert u.output_tokens == want["usage"]["completion_tokens"]
    raw = httpx.post(server.url + "/v1/messages", headers={"x-api-key": KEY}, json={
        "model": "tiny", "system": SYSTEM, "messages": user("Hello there"), "max_tokens": 10, **GREEDY}).json()
    assert anthropic.types.Message.model_validate(raw).content[0].text == text  # the SDK's type, validated

    # streaming, with the key as Bearer (DeepSeek takes both)
    bearer = client(server, api_key=None, auth_token=KEY)
    with bearer.messages.stream(model="deepseek-chat", system=[{"type": "text", "text": SYSTEM}],
                                messages=user("Hello there"), max_tokens=10, extra_body=GREEDY) as s:
        pieces = [e.text for e in s if e.type == "text"]
        final = s.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == text
    assert final.content[0].text == text and final.stop_reason == stop and final.usage.output_tokens == u.output_tokens

    events = raw_events(server, {"model": "tiny", "system": SYSTEM, "messages": user("Hello there"),
                                 "max_tokens": 10, **GREEDY})
    assert check_sequence(events) == ["text"]
    assert events[1][0] == "ping"  # right after message_start, as Anthropic sends it
    start, delta = events[0][1]["message"], events[-2][1]
    assert start["content"] == [] and start["stop_reason"] is None and start["role"] == "assistant"
    assert start["usage"]["input_tokens"] + start["usage"]["cache_read_input_tokens"] == want["usage"]["prompt_tokens"]
    assert delta["delta"] == {"stop_reason": stop, "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == want["usage"]["completion_tokens"]


def test_stop_sequences(tiny):
    server, _ = tiny
    text = client(server).messages.create(model="tiny", messages=user("Tell me"), max_tokens=12,
                                          extra_body=GREEDY).content[0].text
    word = text.split()[len(text.split()) // 2]
    r = client(server).messages.create(model="tiny", messages=user("Tell me"), max_tokens=12, stop_sequences=[word],
                                       extra_body=GREEDY)
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == word
    assert r.content[0].text == text[: text.index(word)]


def test_assistant_prefill(tiny):
    server, _ = tiny
    history = [*user("Count to three"), {"role": "assistant", "content": "One, two,"}]
    want = chat(server, {"model": "tiny", "max_tokens": 6, **GREEDY,
                         "messages": [history[0], {**history[1], "prefix": True}]})["choices"][0]["message"]
    r = client(server).messages.create(model="tiny", messages=history, max_tokens=6, extra_body=GREEDY)
    assert [(b.type, b.text) for b in r.content] == [("text", want["content"])]  # only the continuation


# ---- thinking ---------------------------------------------------------------------------------------------


def test_thinking(tiny):
    server, _ = tiny
    want = chat(server, {"model": "tiny", "messages": user("Think first"), "max_tokens": 8,
                         "thinking": {"type": "enabled"}, **GREEDY})["choices"][0]["message"]
    assert want["reasoning_content"]  # the prompt opened <think>: the random model's tokens are reasoning
    c = client(server)
    r = c.messages.create(model="tiny", messages=user("Think first"), max_tokens=8, extra_body=GREEDY,
                          thinking={"type": "enabled", "budget_tokens": 1024})
    blocks = [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in r.content]
    expected = [("thinking", want["reasoning_content"])] + ([("text", want["content"])] if want["content"] else [])
    assert blocks == expected and isinstance(r.content[0], anthropic.types.ThinkingBlock)
    with c.messages.stream(model="tiny", messages=user("Think first"), max_tokens=8, extra_body=GREEDY,
                           thinking={"type": "enabled", "budget_tokens": 1024}) as s:
        thoughts = "".join(e.thinking for e in s if e.type == "thinking")
        final = s.get_final_message()
    assert thoughts == want["reasoning_content"] and final.content[0].thinking == thoughts

    off = chat(server, {"model": "tiny", "messages": user("Think first"), "max_tokens": 8,
                        "thinking": {"type": "disabled"}, **GREEDY})["choices"][0]["message"]
    r = c.messages.create(model="tiny", messages=user("Think first"), max_tokens=8, extra_body=GREEDY,
                          thinking={"type": "disabled"})
    assert [(b.type, b.text) for b in r.content] == [("text", off["content"])]


def test_stream_blocks_from_engine_deltas():
    """thinking -> text -> two tool calls, through the route's stream encoder and ChatChoice parsing, fed
    engine deltas of a V3.1 answer (a random model never writes </think>), and read back by the SDK."""
    from selfseek.server.tools import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP

    answer = (f"Let me check the weather.</think>Checking now.{CALLS_BEGIN}{CALL_BEGIN}get_weather{SEP}"
              f'{{"city": "Paris"}}{CALL_END}{CALL_BEGIN}get_weather{SEP}{{"city": "Tokyo"}}{CALL_END}{CALLS_END}')
    pieces = [answer[i:i + 4] for i in range(0, len(answer), 4)]

    async def deltas():
        for i, p in enumerate(pieces):
            last = i == len(pieces) - 1
            yield RequestDelta("r", 0, [i], p, finish_reason="stop" if last else None, num_cached_tokens=3)

    svc = SimpleNamespace(config=SimpleNamespace(keep_alive_interval=10.0))
    choice = ChatChoice(0, svc, ReasoningParser(in_reasoning=True), FORMATS["deepseek_v31"].parser(True), None)

    async def collect() -> bytes:
        head = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m"}
        gen = Generation(svc, deltas(), [choice], 20, abort=lambda: None)
        return b"".join([b async for b in _stream(gen, head, [])])

    body = asyncio.run(collect())
    events = [(b.split("\n")[0][len("event: "):], json.loads(b.split("\n")[1][len("data: "):]))
              for b in body.decode().split("\n\n") if b]
    assert check_sequence(events) == ["thinking", "text", "tool_use", "tool_use"]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert events[-2][1]["usage"] == {"input_tokens": 17, "output_tokens": len(pieces), "cache_read_input_tokens": 3,
                                      "cache_creation_input_tokens": 0}

    # the SDK's own stream reader and accumulator, over these bytes
    import httpx2  # the HTTP client this SDK version is built on

    transport = httpx2.MockTransport(lambda request: httpx2.Response(
        200, headers={"content-type": "text/event-stream"}, content=body))
    sdk = anthropic.Anthropic(api_key="x", base_url="http://test", http_client=httpx2.Client(transport=transport))
    with sdk.messages.stream(model="m", max_tokens=5, messages=user("?")) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert final.content[0].thinking == "Let me check the weather." and final.content[1].text == "Checking now."
    assert [b.input for b in final.content[2:]] == [{"city": "Paris"}, {"city": "Tokyo"}]
    assert final.stop_reason == "tool_use" and final.usage.cache_read_input_tokens == 3


# ---- tools ------------------------------------------------------------------------------------------------


def test_tools_match_chat_completions(tiny):
    server, _ = tiny
    want = chat(server, {"model": "tiny", "messages": user("Weather?"), "tools": OPENAI_TOOLS, "max_tokens": 60,
                         "tool_choice": "required", "parallel_tool_calls": False, **GREEDY})["choices"][0]
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in want["message"]["tool_calls"]]
    any_one = {"type": "any", "disable_parallel_tool_use": True}
    c = client(server)
    r = c.messages.create(model="tiny", messages=user("Weather?"), tools=TOOLS, tool_choice=any_one, max_tokens=60,
                          extra_body=GREEDY)
    assert r.stop_reason == "tool_use" and all(isinstance(b, anthropic.types.ToolUseBlock) for b in r.content)
    assert [(b.name, b.input) for b in r.content] == calls and calls[0][1]["city"] in ("Paris", "Tokyo")

    events = raw_events(server, {"model": "tiny", "messages": user("Weather?"), "tools": TOOLS,
                                 "tool_choice": any_one, "max_tokens": 60, **GREEDY})
    assert check_sequence(events) == ["tool_use"] * len(calls)
    for k, (name, args) in enumerate(calls):
        start = next(d for n, d in events if n == "content_block_start" and d["index"] == k)
        assert start["content_block"]["name"] == name and start["content_block"]["input"] == {}
        streamed = "".join(d["delta"]["partial_json"] for n, d in events
                           if n == "content_block_delta" and d["index"] == k)
        assert json.loads(streamed) == args

    # a named tool, one call only
    one = c.messages.create(model="tiny", messages=user("Weather?"), tools=TOOLS, max_tokens=60, extra_body=GREEDY,
                            tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True})
    assert [b.name for b in one.content] == ["get_weather"] and one.stop_reason == "tool_use"

    # the round trip: tool_use in the assistant turn, tool_result (and text) in the next user turn
    call = r.content[0]
    history = [*user("Weather?"),
               {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                                 {"type": "tool_use", "id": call.id, "name": call.name,
                                                  "input": call.input}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"},
                                            {"type": "text", "text": "Thanks!"}]}]
    count = c.messages.count_tokens(model="tiny", messages=history, tools=TOOLS)
    same = [*user("Weather?"),
            {"role": "assistant", "content": "Let me look.",
             "tool_calls": [{"id": call.id, "type": "function",
                             "function": {"name": call.name, "arguments": json.dumps(call.input)}}]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"}, *user("Thanks!")]
    tokens = httpx.post(server.url + "/tokenize", json={"messages": same, "tools": OPENAI_TOOLS},
                        headers={"Authorization": f"Bearer {KEY}"}).json()
    assert count.input_tokens == tokens["count"]
    after = c.messages.create(model="tiny", messages=history, tools=TOOLS, max_tokens=4, extra_body=GREEDY)
    assert after.usage.input_tokens + after.usage.cache_read_input_tokens == tokens["count"]


# ---- count_tokens and errors ------------------------------------------------------------------------------


def test_count_tokens(tiny):
    server, _ = tiny
    c = client(server)
    n = c.messages.count_tokens(model="claude-other-model", system="Be brief.", messages=user("How many tokens?"))
    assert isinstance(n, anthropic.types.MessageTokensCount)
    r = c.messages.create(model="tiny", system="Be brief.", messages=user("How many tokens?"), max_tokens=1)
    assert n.input_tokens == r.usage.input_tokens + r.usage.cache_read_input_tokens > 5
    assert c.messages.count_tokens(model="tiny", messages=user("How many tokens?")).input_tokens < n.input_tokens


def test_errors(tiny):
    server, _ = tiny
    with pytest.raises(anthropic.AuthenticationError) as e:
        client(server, api_key="wrong").messages.create(model="tiny", messages=user("Hi"), max_tokens=2)
    body = e.value.body
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error" and "API key" in str(body)

    def post(body: dict, path: str = "/anthropic/v1/messages") -> httpx.Response:
        return httpx.post(server.url + path, json=body, headers={"x-api-key": KEY})

    r = post({"model": "tiny", "messages": user("Hi")})  # no max_tokens: Anthropic requires it
    assert r.status_code in (400, 422) and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error" and "max_tokens" in r.json()["error"]["message"]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    r = post({"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [image]}]})
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "messages[0].content" in error["message"]
    assert "content[0] is a 'image' block" in error["message"]
    r = post({"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]})
    assert r.status_code == 400 and "messages[0].content[0]" in r.json()["error"]["message"]
    r = post({"model": "tiny", "max_tokens": 2, "messages": user("Hi"), "tools": [{"type": "web_search_20250305",
                                                                                    "name": "web_search"}]})
    assert r.status_code == 400 and "server tools (web_search_20250305)" in r.json()["error"]["message"]
    r = post({"model": "tiny", "max_tokens": 2, "messages": user("Hi"), "tools": [{"name": "f"}]})
    assert r.status_code == 400 and "input_schema" in r.json()["error"]["message"]
    r = post({"model": "tiny", "max_tokens": 2, "messages": user("Hi"), "temperature": "hot"})
    assert r.json()["error"]["type"] == "invalid_request_error" and "temperature" in r.json()["error"]["message"]
    assert post({}, "/anthropic/v1/nope").json()["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError, match="tool_result blocks belong in a user message"):
        client(server).messages.create(model="tiny", max_tokens=2, messages=[{"role": "assistant", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": "x"}]}])
    # the OpenAI routes keep their own envelope
    assert "type" not in httpx.post(server.url + "/v1/chat/completions", json={},
                                    headers={"x-api-key": KEY}).json()


def test_models_list(tiny):
    server, svc = tiny
    page = client(server).models.list()
    assert [m.id for m in page.data] == svc.model_names() and page.data[0].type == "model"


@pytest.mark.slow
def test_default_model():
    """The default model (SmolLM2-135M-Instruct) through the SDK, when it is installed."""
    try:
        svc = build_service(None, "float32", "cpu", None, {"kv_cache_memory": 64 << 20, "max_model_len": 1024})
    except Exception as e:  # noqa: BLE001 - any reason it cannot load is a reason to skip
        pytest.skip(f"the default model is not available: {e}")
    server = LiveServer(create_app(svc))
    try:
        c = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0)  # /v1/messages
        r = c.messages.create(model="claude-some-model", messages=user("What is the capital of France?"),
                              max_tokens=16, extra_body=GREEDY)
        assert "Paris" in r.content[0].text
        with c.messages.stream(model="claude-some-model", messages=user("What is the capital of France?"),
                               max_tokens=16, extra_body=GREEDY) as s:
            assert "".join(s.text_stream) == r.content[0].text
        r = c.messages.create(model="claude-some-model", messages=user("Weather in Paris?"), tools=TOOLS,
                              tool_choice={"type": "tool", "name": "get_weather"}, max_tokens=60, extra_body=GREEDY)
        assert r.stop_reason == "tool_use" and r.content[0].input["city"] in ("Paris", "Tokyo")
    finally:
        server.stop()
        svc.engine.shutdown()
