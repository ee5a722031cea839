"""Unit tests of the server's text parsers (reasoning, tool calls) and grammars, with split tags."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("llguidance")

from server_helpers import deepseek_tokenizer  # noqa: E402

from selfseek.server.reasoning import ReasoningParser  # noqa: E402
from selfseek.server.structured import GrammarCompiler, json_rule, with_reasoning  # noqa: E402
from selfseek.server.tools import (  # noqa: E402
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    DSML,
    FORMATS,
    SEP,
    Function,
    detect_format,
)


def pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def run_reasoning(chunks: list[str], in_reasoning: bool) -> tuple[str, str]:
    p = ReasoningParser(in_reasoning)
    r = c = ""
    for ch in chunks:
        a, b = p.feed(ch)
        r, c = r + a, c + b
    a, b = p.finish()
    return r + a, c + b


@pytest.mark.parametrize("size", [1, 2, 3, 100])
def test_reasoning_shapes(size):
    # R1 / V3.1 thinking: <think> is in the prompt, only </think> comes out
    assert run_reasoning(pieces("Let me think.\n</think>\n\nThe answer.", size), True) == ("Let me think.\n",
                                                                                          "The answer.")
    # R1-0528: both tags in the output
    assert run_reasoning(pieces("<think>\nhmm</think>Done", size), False) == ("\nhmm", "Done")
    # no tags: all content; or all reasoning when the prompt opened it (cut off by max_tokens)
    assert run_reasoning(pieces("Just an answer <th", size), False) == ("", "Just an answer <th")
    assert run_reasoning(pieces("still thinking </thi", size), True) == ("still thinking </thi", "")
    # a "<think>" later in an answer is content
    assert run_reasoning(pieces("a <think> b", size), False) == ("", "a <think> b")


def test_reasoning_holds_back_only_a_possible_tag():
    p = ReasoningParser(True)
    assert p.feed("abc</") == ("abc", "")
    assert p.feed("x") == ("</x", "")
    assert p.feed("</think>ok") == ("", "ok")


def run_tools(fmt: str, chunks: list[str]) -> tuple[str, list[dict], list[dict]]:
    p = FORMATS[fmt].parser()
    content, deltas = "", []
    for ch in chunks:
        c, d = p.feed(ch)
        content += c
        deltas += d
    c, d = p.finish()
    return content + c, deltas + d, p.calls


def check_stream(deltas: list[dict], calls: list[dict]) -> None:
    """The deltas rebuild the calls: name and id once, arguments as fragments that concatenate."""
    for i, call in enumerate(calls):
        mine = [d for d in deltas if d["index"] == i]
        assert mine[0]["id"] == call["id"] and mine[0]["function"]["name"] == call["function"]["name"]
        assert all("id" not in d and "name" not in d["function"] for d in mine[1:])
        assert "".join(d["function"]["arguments"] for d in mine) == call["function"]["arguments"]


V31 = (f"Sure.{CALLS_BEGIN}{CALL_BEGIN}get_weather{SEP}{{\"city\": \"Tokyo\"}}{CALL_END}"
       f"{CALL_BEGIN}get_time{SEP}{{}}{CALL_END}{CALLS_END}")
V3 = (f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_weather\n```json\n{{\"city\": \"Tokyo\"}}\n```{CALL_END}\n"
      f"{CALL_BEGIN}function{SEP}get_time\n```json\n{{}}\n```{CALL_END}{CALLS_END}")
GENERIC = ('Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo", "n": [1, "}"]}}\n'
           '</tool_call>\n<tool_call>\n{"arguments": {}, "name": "get_time"}\n</tool_call>')
V32 = (f"<{DSML}function_calls>\n<{DSML}invoke name=\"get_weather\">\n"
       f"<{DSML}parameter name=\"city\" string=\"true\">Tokyo</{DSML}parameter>\n"
       f"<{DSML}parameter name=\"days\" string=\"false\">3</{DSML}parameter>\n</{DSML}invoke>\n"
       f"<{DSML}invoke name=\"get_time\">\n</{DSML}invoke>\n</{DSML}function_calls>")


@pytest.mark.parametrize("size", [1, 5, 1000])
@pytest.mark.parametrize("fmt,text,content,args", [
    ("deepseek_v31", V31, "Sure.", [{"city": "Tokyo"}, {}]),
    ("deepseek_v3", V3, "", [{"city": "Tokyo"}, {}]),
    ("generic", GENERIC, "Let me look. ", [{"city": "Tokyo", "n": [1, "}"]}, {}]),
    ("deepseek_v32", V32, "", [{"city": "Tokyo", "days": 3}, {}]),
])
def test_tool_parsers(fmt, text, content, args, size):
    got_content, deltas, calls = run_tools(fmt, pieces(text, size))
    assert got_content == content
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == args
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_") for c in calls)
    check_stream(deltas, calls)


def test_tool_parser_streams_arguments_before_the_call_ends():
    p = FORMATS["deepseek_v31"].parser()
    assert p.feed(f"{CALLS_BEGIN}{CALL_BEGIN}f{SEP}") == ("", [
        {"index": 0, "id": p.calls[0]["id"], "type": "function", "function": {"name": "f", "arguments": ""}}])
    assert p.feed('{"a": ') == ("", [{"index": 0, "function": {"arguments": '{"a": '}}])
    assert p.feed("1}<｜tool▁call") == ("", [{"index": 0, "function": {"arguments": "1}"}}])  # end tag held back


def test_tool_parser_without_calls_is_content():
    assert run_tools("deepseek_v31", pieces("plain <｜tool answer", 3))[:2] == ("plain <｜tool answer", [])
    assert run_tools("generic", ["<tool_call>not json"])[:2] == ("<tool_call>not json", [])


def test_detect_format():
    assert detect_format(deepseek_tokenizer("deepseek-v3")).name == "deepseek_v3"
    assert detect_format(deepseek_tokenizer("deepseek-r1")).name == "deepseek_v3"
    assert detect_format(deepseek_tokenizer("deepseek-v3.1")).name == "deepseek_v31"
    assert detect_format(deepseek_tokenizer("deepseek-v3.2")).name == "deepseek_v32"
    assert detect_format(deepseek_tokenizer("deepseek-llm-7b-base")).name == "generic"


# ---- grammars, run against the real V3.1 / V3.2 tokenizers -------------------------------------------------

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
           "required": ["city", "days"], "additionalProperties": False}


@pytest.fixture(scope="module")
def compilers():
    out = {}
    for name in ("deepseek-v3.1", "deepseek-v3.2"):
        tok = deepseek_tokenizer(name)
        out[name] = (tok, GrammarCompiler(tok, 129280, tok.stop_ids))
    return out


def accepts(tok, compiler, grammar: str, text: str) -> bool:
    """Whether the constraint lets `text` (as the tokenizer encodes it) through and then allows EOS."""
    proc = compiler.processor(grammar)
    ids = tok.encode(text, add_special_tokens=False)
    for k in range(len(ids) + 1):
        row = proc(ids[:k], torch.zeros(129280))
        if k < len(ids) and row[ids[k]] == float("-inf"):
            return False
    return bool(row[tok.eos_id] != float("-inf"))


def test_json_grammar_after_reasoning(compilers):
    tok, gc = compilers["deepseek-v3.1"]
    grammar = with_reasoning(f"body: {json_rule(WEATHER)}", True, tok.token_to_id("</think>"))
    assert accepts(tok, gc, grammar, 'Any text, even { or "</th".</think>\n\n{"city": "Paris", "days": 2}')
    assert not accepts(tok, gc, grammar, '</think>{"city": "Paris"}')
    assert not accepts(tok, gc, grammar, '</think>{"city": "Paris", "days": 2} trailing')
    plain = with_reasoning(f"body: {json_rule(None)}", False, None)
    assert accepts(tok, gc, plain, '{"anything": [1, {"x": null}]}')
    assert not accepts(tok, gc, plain, "[1, 2]")


@pytest.mark.parametrize("fmt,text_ok,text_bad", [
    ("deepseek_v31", f'{CALLS_BEGIN}{CALL_BEGIN}get_weather{SEP}{{"city": "X", "days": 1}}{CALL_END}{CALLS_END}',
     f'{CALLS_BEGIN}{CALL_BEGIN}get_weather{SEP}{{"city": 1}}{CALL_END}{CALLS_END}'),
    ("deepseek_v3", f'{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_weather\n```json\n{{"city": "X", "days": 1}}\n```'
                    f"{CALL_END}{CALLS_END}", f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}nope\n```json\n{{}}"),
    ("generic", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "X", "days": 1}}\n</tool_call>',
     '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'),
])
def test_tool_grammars(compilers, fmt, text_ok, text_bad):
    tok, gc = compilers["deepseek-v3.1"]
    functions = [Function("get_weather", None, WEATHER, strict=True), Function("get_time", None, {"type": "object"})]
    for mode in ("required", "named", "auto"):
        rules = FORMATS[fmt].grammar(functions, mode, True, gc.literal, gc.added)
        grammar = with_reasoning(rules, False, None)
        gc.check(grammar)
        assert accepts(tok, gc, grammar, text_ok), mode
        assert not accepts(tok, gc, grammar, text_bad), mode
        assert accepts(tok, gc, grammar, "No call needed.") == (mode == "auto")


def test_dsml_grammar(compilers):
    tok, gc = compilers["deepseek-v3.2"]
    rules = FORMATS["deepseek_v32"].grammar([Function("get_weather", None, WEATHER)], "required", True, gc.literal,
                         gc.added)
    grammar = with_reasoning(rules, False, None)
    text = (f"<{DSML}function_calls>\n<{DSML}invoke name=\"get_weather\">\n"
            f"<{DSML}parameter name=\"city\" string=\"true\">Tokyo</{DSML}parameter>\n"
            f"<{DSML}parameter name=\"days\" string=\"false\">3</{DSML}parameter>\n</{DSML}invoke>\n"
            f"</{DSML}function_calls>")
    assert accepts(tok, gc, grammar, text)
    assert not accepts(tok, gc, grammar, text.replace(">3<", ">three<"))
    assert FORMATS["deepseek_v32"].grammar([Function("f", None, WEATHER)], "auto", True, gc.literal, gc.added) is None


def test_keep_alive_while_waiting():
    import asyncio

    from selfseek.server.sse import with_keep_alive

    closed = []

    async def slow():
        try:
            await asyncio.sleep(0.35)
            yield "a"
            yield "b"
        finally:
            closed.append(True)

    async def run():
        return [x async for x in with_keep_alive(slow(), 0.1)]

    out = asyncio.run(run())
    assert out[-2:] == ["a", "b"] and 2 <= out.count(None) <= 4 and closed == [True]

    async def leave_early():  # the consumer goes away while waiting: the source is closed (request aborted)
        closed.clear()
        async for x in with_keep_alive(slow(), 0.1):
            if x is None:
                break
        await asyncio.sleep(0)

    asyncio.run(leave_early())
    assert closed == [True]


# ---- prompts ----------------------------------------------------------------------------------------------


def test_render_chat_reasoning_and_prefix():
    from selfseek.server.prompts import render_chat

    r1 = deepseek_tokenizer("deepseek-r1")
    p = render_chat(r1, FORMATS["deepseek_v3"], [{"role": "user", "content": "Hi"}], supports_thinking=True)
    assert p.text.endswith("<｜Assistant｜><think>\n") and p.reasoning_open  # R1 opens reasoning itself
    v31 = deepseek_tokenizer("deepseek-v3.1")
    msgs = [{"role": "user", "content": "Hi"}]
    assert render_chat(v31, FORMATS["deepseek_v31"], msgs, thinking=True, supports_thinking=True).reasoning_open
    off = render_chat(v31, FORMATS["deepseek_v31"], msgs, thinking=False, supports_thinking=True)
    assert off.text.endswith("<｜Assistant｜></think>") and not off.reasoning_open
    # prefix: reasoning continues the open thought; content comes after </think>
    p = render_chat(v31, FORMATS["deepseek_v31"], msgs, thinking=True, supports_thinking=True,
                    prefix={"reasoning_content": "Let me see", "content": ""})
    assert p.text.endswith("<think>Let me see") and p.reasoning_open
    p = render_chat(v31, FORMATS["deepseek_v31"], msgs, thinking=True, supports_thinking=True,
                    prefix={"reasoning_content": "Done.", "content": "```python\n"})
    assert p.text.endswith("<think>Done.</think>```python\n") and not p.reasoning_open
    # tools join the system prompt, in the format the model was trained on
    tools = [Function("get_weather", "Weather.", WEATHER)]
    p = render_chat(v31, FORMATS["deepseek_v31"], [{"role": "system", "content": "Be brief."}, *msgs], tools)
    assert p.text.startswith("<｜begin▁of▁sentence｜>Be brief.\n\n## Tools\n") and "### get_weather" in p.text


def test_encode_v32():
    from selfseek.server.prompts import render_chat

    v32 = deepseek_tokenizer("deepseek-v3.2")
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "reasoning_content": "Use the tool.", "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    p = render_chat(v32, FORMATS["deepseek_v32"], msgs, [Function("get_weather", "Weather.", WEATHER)], thinking=True,
                    supports_thinking=True)
    text = p.text
    assert text.startswith("<｜begin▁of▁sentence｜>\n\n## Tools\n")
    assert f"<｜User｜>Weather?<｜Assistant｜><think>Use the tool.</think>\n\n<{DSML}function_calls>\n" in text
    assert f'<{DSML}parameter name="city" string="true">Paris</{DSML}parameter>' in text
    assert f'<{DSML}parameter name="days" string="false">2</{DSML}parameter>' in text
    assert text.endswith("<function_results>\n<result>sunny</result>\n</function_results>\n\n<think>")
    assert p.reasoning_open


def test_generation_events_totals_and_errors():
    """The one streaming loop (server/stream.py): events per completion, cached tokens counted once per prompt,
    usage totals, and a failed delta raised as its APIError by collect() with the request aborted."""
    import asyncio
    from types import SimpleNamespace

    from selfseek.engine.async_engine import RequestDelta
    from selfseek.engine.errors import RequestError
    from selfseek.server.openai import TextChoice
    from selfseek.server.protocol import APIError
    from selfseek.server.stream import Generation

    svc = SimpleNamespace(config=SimpleNamespace(keep_alive_interval=10.0))

    async def deltas(fail: bool):  # 2 prompts x n=2; the prompts' first completions report cache hits
        yield RequestDelta("r", 0, [1], "a", num_cached_tokens=4)
        yield RequestDelta("r", 2, [2], "b", num_cached_tokens=8)
        yield RequestDelta("r", 1, [3], "c", num_cached_tokens=4)
        yield RequestDelta("r", 0, [4, 5], "de", finish_reason="stop", num_cached_tokens=4)
        if fail:
            yield RequestDelta("r", 1, [], "", finish_reason="abort", error=RequestError("bad stop string"))
            return
        for i in (1, 2, 3):
            yield RequestDelta("r", i, [6], "f", finish_reason="length")

    def generation(fail: bool, aborted: list) -> Generation:
        choices = [TextChoice(i, svc, "", None) for i in range(4)]
        return Generation(svc, deltas(fail), choices, 30, lambda: aborted.append(True), per_prompt=2)

    async def events(gen: Generation) -> list:
        return [(e.choice.index, e.finished, e.last) async for e in gen.events()]

    gen = generation(False, [])
    got = asyncio.run(events(gen))
    assert got[-1] == (3, True, True) and [e for e in got if e[2]] == [got[-1]]
    assert [c.text for c in gen.choices] == ["ade", "cf", "bf", "f"]
    u = gen.usage()
    assert (u["prompt_tokens"], u["completion_tokens"], u["prompt_cache_hit_tokens"]) == (30, 8, 12)

    aborted: list = []
    gen = generation(True, aborted)
    request = SimpleNamespace(is_disconnected=lambda: asyncio.sleep(0, False))
    with pytest.raises(APIError) as e:
        asyncio.run(gen.collect(request))
    assert e.value.status == 400 and "bad stop string" in e.value.message and aborted
