"""Tool calls: the token formats DeepSeek models were trained on, plus a generic one for other models.

One ToolFormat per family, picked from the checkpoint's chat template (detect_format), holds all of it: the tool
list the server adds to the system prompt (DeepSeek's templates render tool calls and results in the history
but not the tool list), past calls and results where the template cannot render them, a streaming parser from
model text to OpenAI `tool_calls` deltas, and the grammar that constrains the calls when asked to.

Families (architecture.md §10.2, api.md §5):
- deepseek_v3 (V3, V3-0324, R1, R1-0528): `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
  \\n```json\\nARGS\\n```<｜tool▁call▁end｜>` ... `<｜tool▁calls▁end｜>`, calls separated by "\\n";
- deepseek_v31 (V3.1): `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>`, no type, no fence;
- deepseek_v32 (V3.2, no Jinja template): DSML markup, one `<｜DSML｜parameter>` element per argument;
- generic (a template without a tool format, e.g. SmolLM2's): documented in GENERIC_FORMAT below.

Parsers work on text, not token ids, so they hold when a marker arrives in pieces (a constrained decode
may spell `<｜tool▁sep｜>` byte by byte; a tokenizer may lack the token). Each feed re-scans the calls
region (small) and sends what is new: the name once, then argument text only ever appended to.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from selfseek.server.reasoning import THINK_END, THINK_START, partial_suffix
from selfseek.server.structured import json_rule
from selfseek.tokenizer import Tokenizer

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
DSML = "｜DSML｜"
DSML_BEGIN, DSML_END = f"<{DSML}function_calls>", f"</{DSML}function_calls>"
GENERIC_BEGIN, GENERIC_END = "<tool_call>", "</tool_call>"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

GENERIC_FORMAT = """\
You can call functions. Each call is one JSON object with the function's name and its arguments,
inside <tool_call></tool_call> tags, one call per block:
<tool_call>
{"name": "<function name>", "arguments": {<arguments as a JSON object>}}
</tool_call>"""


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class Function:
    name: str
    description: str | None
    parameters: dict
    strict: bool = False


# ---- parsing ---------------------------------------------------------------------------------------------


@dataclass
class _Scanned:
    name: str | None  # None until the name is complete
    args: str  # argument text known so far (only ever grows)
    done: bool


class ToolCallParser:
    """Streaming: feed(text) -> (content, tool_call_deltas); finish() at the end; `calls` is the result.

    Content is the text before the first call; text after the calls block is dropped (as vLLM and SGLang
    do). Deltas follow OpenAI's chunk format: {"index", "id", "type", "function": {"name", "arguments": ""}}
    once per call, then {"index", "function": {"arguments": fragment}}.
    """

    triggers: tuple[str, ...] = ()

    def __init__(self, parallel: bool = True):
        self.parallel = parallel
        self._buf = ""  # content not yet sent (a possible partial trigger)
        self._region: str | None = None  # the calls region once a trigger was seen
        self._ids: list[str] = []
        self._sent: list[int] = []  # argument characters sent per call
        self.calls: list[dict] = []

    def feed(self, text: str) -> tuple[str, list[dict]]:
        if self._region is None:
            self._buf += text
            hits = [(self._buf.find(t), t) for t in self.triggers if t in self._buf]
            if not hits:
                keep = max((partial_suffix(self._buf, t) for t in self.triggers), default=0)
                content, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                return content, []
            pos = min(hits)[0]
            content, self._region, self._buf = self._buf[:pos], self._buf[pos:], ""
            return content, self._diff(final=False)
        self._region += text
        return "", self._diff(final=False)

    def finish(self) -> tuple[str, list[dict]]:
        if self._region is None:
            rest, self._buf = self._buf, ""
            return rest, []
        deltas = self._diff(final=True)
        if not self.calls:  # a trigger but no call came of it: the text was content after all
            return self._region, []
        return "", deltas

    def _diff(self, final: bool) -> list[dict]:
        scanned = [s for s in self._scan(self._region, final) if s.name is not None or not final]
        if not self.parallel:
            scanned = scanned[:1]
        deltas = []
        for i, s in enumerate(scanned):
            if s.name is None:
                break
            if i == len(self._ids):
                self._ids.append(new_call_id())
                self._sent.append(0)
                self.calls.append({"id": self._ids[i], "type": "function",
                                   "function": {"name": s.name, "arguments": ""}})
                deltas.append({"index": i, "id": self._ids[i], "type": "function",
                               "function": {"name": s.name, "arguments": ""}})
            if len(s.args) > self._sent[i]:
                deltas.append({"index": i, "function": {"arguments": s.args[self._sent[i]:]}})
                self._sent[i] = len(s.args)
                self.calls[i]["function"]["arguments"] = s.args
        return deltas

    def _scan(self, region: str, final: bool) -> list[_Scanned]:
        raise NotImplementedError


def _args_until(text: str, closers: tuple[str, ...], final: bool) -> tuple[str, bool]:
    """Argument text before the first complete closer; while none is complete, all but a possible partial
    one (so what is sent is always a prefix of the final arguments)."""
    ends = [(text.find(c), c) for c in closers if c in text]
    if ends:
        return text[: min(ends)[0]], True
    if final:
        return text, True
    keep = max(partial_suffix(text, c) for c in closers)
    return text[: len(text) - keep], False


class DeepSeekV31Parser(ToolCallParser):
    triggers = (CALLS_BEGIN, CALL_BEGIN)

    def _scan(self, region: str, final: bool) -> list[_Scanned]:
        out = []
        for part in region.split(CALLS_END, 1)[0].split(CALL_BEGIN)[1:]:
            if SEP not in part:
                out.append(_Scanned(None, "", False))
                continue
            name, rest = part.split(SEP, 1)
            args, done = _args_until(rest, (CALL_END,), final)
            out.append(_Scanned(name.strip(), args, done))
        return out


class DeepSeekV3Parser(ToolCallParser):
    triggers = (CALLS_BEGIN, CALL_BEGIN)
    # the closing fence, in the shapes models write it, each followed by the call's end token
    _CLOSERS = tuple(f + CALL_END for f in ("\n```\n", "\n```", "```\n", "```", ""))
    _FENCE = re.compile(r"```(?:json)?[ \t]*\n")

    def _scan(self, region: str, final: bool) -> list[_Scanned]:
        out = []
        for part in region.split(CALLS_END, 1)[0].split(CALL_BEGIN)[1:]:
            if SEP not in part:
                out.append(_Scanned(None, "", False))
                continue
            rest = part.split(SEP, 1)[1]
            if "\n" not in rest and CALL_END not in rest and not final:  # the name line is not complete
                out.append(_Scanned(None, "", False))
                continue
            name, _, rest = rest.partition("\n") if "\n" in rest else rest.partition(CALL_END)
            fence = self._FENCE.match(rest)
            if fence:
                rest = rest[fence.end():]
            elif rest.startswith("`") and not final and "\n" not in rest:  # the opening fence is arriving
                out.append(_Scanned(name.strip(), "", False))
                continue
            args, done = _args_until(rest, self._CLOSERS, final)
            out.append(_Scanned(name.strip(), args, done))
        return out


def json_value_end(text: str) -> int | None:
    """Index just past the JSON object or array at the start of `text` (after whitespace); None while open."""
    i = len(text) - len(text.lstrip())
    if i >= len(text) or text[i] not in "{[":
        return None
    depth, in_string, escaped = 0, False, False
    for j in range(i, len(text)):
        c = text[j]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
    return None


class GenericParser(ToolCallParser):
    triggers = (GENERIC_BEGIN,)
    _HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')

    def _scan(self, region: str, final: bool) -> list[_Scanned]:
        out = []
        for part in region.split(GENERIC_BEGIN)[1:]:
            done = GENERIC_END in part
            body = part.split(GENERIC_END, 1)[0]
            head = self._HEAD.match(body)
            if head is None:
                out.append(self._fallback(body) if done or final else _Scanned(None, "", False))
                continue
            name = json.loads(f'"{head.group(1)}"')
            text = body[head.end():]
            end = json_value_end(text)
            if end is not None:
                out.append(_Scanned(name, text[:end], True))
            else:  # still open: all of it belongs to the arguments
                out.append(_Scanned(name, text.rstrip() if done or final else text, done or final))
        return out

    @staticmethod
    def _fallback(body: str) -> _Scanned:
        """A call whose keys came in another order: parsed whole at its end."""
        try:
            obj = json.loads(body)
            args = obj.get("arguments", obj.get("parameters", {}))
            return _Scanned(str(obj["name"]), args if isinstance(args, str) else json.dumps(args, ensure_ascii=False),
                            True)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            return _Scanned(None, "", True)


class DSMLParser(ToolCallParser):
    """V3.2: parameters arrive as XML-like elements; arguments are built as JSON, one parameter at a time."""

    triggers = (DSML_BEGIN,)
    end = DSML_END
    _INVOKE = re.compile(r'\s*name="([^"]*)"\s*>')
    _PARAM = re.compile(rf'<{DSML}parameter name="([^"]*)" string="(true|false)"\s*>(.*?)</{DSML}parameter>',
                        re.DOTALL)

    def _scan(self, region: str, final: bool) -> list[_Scanned]:
        out = []
        for part in region.split(self.end, 1)[0].split(f"<{DSML}invoke")[1:]:
            head = self._INVOKE.match(part)
            if head is None:
                out.append(_Scanned(None, "", False))
                continue
            body = part[head.end():]
            done = f"</{DSML}invoke>" in body or final
            body = body.split(f"</{DSML}invoke>", 1)[0]
            items = [f"{json.dumps(k, ensure_ascii=False)}: {_dsml_value(v, string)}"
                     for k, string, v in self._PARAM.findall(body)]
            out.append(_Scanned(head.group(1), "{" + ", ".join(items) + ("}" if done else ""), done))
        return out


def _dsml_value(raw: str, is_string: str) -> str:
    if is_string == "true":
        return json.dumps(raw, ensure_ascii=False)
    try:
        return json.dumps(json.loads(raw), ensure_ascii=False)
    except json.JSONDecodeError:
        return json.dumps(raw, ensure_ascii=False)


# ---- the families -----------------------------------------------------------------------------------------


class ToolFormat:
    """One tool-call family: how its tool list and past calls are written into the prompt, how its calls are
    parsed from the stream, and the grammar that forces them. A new family is one subclass, listed in FAMILIES."""

    name: str
    parser_class: type[ToolCallParser]
    trigger: str  # the text that opens a calls block
    keeps_special_tokens = False  # its markup is a special token, which detokenizing must not skip
    own_prompt = False  # the model ships no Jinja template: render() writes the whole prompt

    @staticmethod
    def speaks(tokenizer: Tokenizer) -> bool:
        """Whether the checkpoint's chat template (or vocabulary) uses this family."""
        raise NotImplementedError

    def tools_prompt(self, functions: list[Function]) -> str:
        """The tool list, for the system prompt (templates that take no `tools` render none themselves)."""
        raise NotImplementedError

    def history(self, messages: list[dict]) -> list[dict]:
        """The conversation as the template takes it: DeepSeek's templates render past calls and results."""
        return messages

    def render(self, messages: list[dict], thinking: bool | None, functions: list[Function] | None,
               **options) -> str:
        """The whole prompt (own_prompt families only). thinking None: the model's default; options: the request's
        chat_template_kwargs and reasoning_effort (a family reads what its encoder knows)."""
        raise NotImplementedError

    def parser(self, parallel: bool = True) -> ToolCallParser:
        return self.parser_class(parallel)

    def grammar(self, functions: list[Function], mode: str, parallel: bool, lit: Callable[[str], str],
                added: dict[str, int]) -> str | None:
        """Lark rules defining `body` for the model's tool-call output, or None when this family cannot be
        constrained in this mode. mode: "required" (at least one call), "named" (one call of functions[0]),
        "auto" (text, or text then calls, with the calls constrained). lit: text -> Lark literal; added: the
        tokenizer's added tokens."""
        rules: list[str] = []
        names = []
        for i, f in enumerate(functions):
            # a forced or strict call follows the tool's schema, its objects closed (no copying the tool listing
            # into extra keys); a free call in auto mode is any object
            closed = f.strict or mode != "auto"
            schema = f.parameters if closed else {"type": "object"}
            rules.append(f"fn{i}: {self._call(i, f, schema, closed, lit, rules)}")
            names.append(f"fn{i}")
        rules.append(f"fn: {' | '.join(names[:1] if mode == 'named' else names)}")
        multi = parallel and mode != "named"
        begin = self._calls(lambda call, sep: f"{call} ({sep} {call})*" if multi else call, multi, lit, rules)
        # `calls` starts after the block's opening marker, which auto mode leaves to the model
        if mode != "auto":
            rules.append(f"body: {begin} calls")
        elif self.trigger in added:  # an added token ends free text by itself (a regex cannot match it)
            rules += [f"body: TEXT ({begin} calls)?", "TEXT: /(?s:.*)/"]
        else:  # free text alone, or free text up to the trigger's text (lazily), then the calls
            rules += ["body: TEXT | head calls", "TEXT: /(?s:.*)/", f"head[lazy]: /(?s:.*){re.escape(self.trigger)}/"]
        return "\n".join(rules)

    def _call(self, i: int, f: Function, schema: dict, closed: bool, lit: Callable[[str], str],
              rules: list[str]) -> str:
        """The right-hand side of rule fn{i}: one call of f (helper rules go to `rules`)."""
        raise NotImplementedError

    def _calls(self, repeated: Callable[[str, str], str], multi: bool, lit: Callable[[str], str],
               rules: list[str]) -> str:
        """Adds the `calls` rule (the block after its opening marker); returns the opening marker's literal."""
        raise NotImplementedError


class DeepSeekV3Format(ToolFormat):
    """V3, V3-0324, R1, R1-0528: typed calls with fenced JSON arguments, separated by newlines."""

    name, parser_class, trigger = "deepseek_v3", DeepSeekV3Parser, CALLS_BEGIN
    usage = ["\nIMPORTANT: ALWAYS adhere to this exact format for tool use:",
             f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}tool_call_name\n```json\ntool_call_arguments\n```"
             f"{CALL_END}{CALLS_END}",
             "\nWhere `tool_call_name` is one of the available tools and `tool_call_arguments` is valid JSON "
             "following its Parameters schema. Further calls follow the first, separated by a newline."]

    @staticmethod
    def speaks(tokenizer: Tokenizer) -> bool:
        template = tokenizer.chat_template or ""
        return CALL_BEGIN in template and "```json" in template

    def tools_prompt(self, functions: list[Function]) -> str:
        lines = ["## Tools", "You have access to the following tools:"]
        for f in functions:
            lines += [f"\n### {f.name}", f"Description: {f.description or ''}",
                      f"\nParameters: {json.dumps(f.parameters, ensure_ascii=False)}"]
        return "\n".join(lines + self.usage)

    def _call(self, i, f, schema, closed, lit, rules) -> str:
        return f"{lit(f.name + chr(10) + '```json' + chr(10))} {json_rule(schema, closed)}"

    def _calls(self, repeated, multi, lit, rules) -> str:
        rules += [f"call: {lit(CALL_BEGIN + 'function' + SEP)} fn {lit(chr(10) + '```' + CALL_END)}",
                  f"calls: {repeated('call', lit(chr(10)))} {lit(CALLS_END)}"]
        return lit(CALLS_BEGIN)


class DeepSeekV31Format(DeepSeekV3Format):
    """V3.1: NAME<｜tool▁sep｜>ARGS, no type, no fence, calls chained without separators."""

    name, parser_class = "deepseek_v31", DeepSeekV31Parser
    # V3.1's model card wording, which the model was trained on
    usage = ["\nIMPORTANT: ALWAYS adhere to this exact format for tool use:",
             f"{CALLS_BEGIN}{CALL_BEGIN}tool_call_name{SEP}tool_call_arguments{CALL_END}"
             f"{{{{additional_tool_calls}}}}{CALLS_END}",
             "\nWhere:\n- `tool_call_name` must be an exact match to one of the available tools",
             "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema",
             "- For multiple tool calls, chain them directly without separators or spaces"]

    @staticmethod
    def speaks(tokenizer: Tokenizer) -> bool:
        template = tokenizer.chat_template or ""
        return CALL_BEGIN in template and "```json" not in template

    def _call(self, i, f, schema, closed, lit, rules) -> str:
        return f"{lit(f.name + SEP)} {json_rule(schema, closed)}"

    def _calls(self, repeated, multi, lit, rules) -> str:
        rules += [f"call: {lit(CALL_BEGIN)} fn {lit(CALL_END)}", f"calls: call{'+' if multi else ''} {lit(CALLS_END)}"]
        return lit(CALLS_BEGIN)


class DSMLFormat(ToolFormat):
    """V3.2 (no Jinja template; its Python encoder is reproduced in render()): DSML markup, one parameter element
    per argument, spelled with the ｜DSML｜ special token."""

    name, parser_class, trigger = "deepseek_v32", DSMLParser, DSML_BEGIN
    keeps_special_tokens = own_prompt = True

    @staticmethod
    def speaks(tokenizer: Tokenizer) -> bool:
        return not tokenizer.chat_template and tokenizer.token_to_id(DSML) is not None

    def tools_prompt(self, functions: list[Function]) -> str:
        d = DSML
        schemas = "\n".join(
            json.dumps({"name": f.name, "description": f.description or "", "parameters": f.parameters},
                       ensure_ascii=False) for f in functions)
        return (
            "## Tools\n\nYou have access to a set of tools you can use to answer the user's question.\n"
            f'You can invoke functions by writing a "<{d}function_calls>" block like the following as part of '
            f"your reply to the user:\n<{d}function_calls>\n<{d}invoke name=\"$FUNCTION_NAME\">\n"
            f'<{d}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{d}parameter>\n...\n'
            f"</{d}invoke>\n<{d}invoke name=\"$FUNCTION_NAME2\">\n...\n</{d}invoke>\n</{d}function_calls>\n\n"
            "String and scalar parameters should be specified as is without any escaping or quotes, while lists "
            'and objects should use JSON format. The "string" attribute should be set to "true" for string type '
            'parameters and "false" for other types (numbers, booleans, arrays, objects).\n\n'
            f"Here are the functions available in JSONSchema format:\n<functions>\n{schemas}\n</functions>\n"
        )

    @staticmethod
    def call_text(name: str, arguments: str) -> str:
        """A past call, as the model writes it."""
        try:
            args = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            args = {}
        params = "\n".join(
            f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
            f"{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}</{DSML}parameter>"
            for k, v in (args.items() if isinstance(args, dict) else []))
        return f'<{DSML}invoke name="{name}">\n{params}\n</{DSML}invoke>'

    def render(self, messages: list[dict], thinking: bool | None, functions: list[Function] | None,
               **options) -> str:
        """DeepSeek-V3.2's prompt encoding: user turns end with <think> (thinking, last user turn) or </think>;
        earlier reasoning is dropped; tools are listed in the system prompt in DSML; results follow the calls
        inside <function_results>."""
        thinking = bool(thinking)  # V3.2 answers without thinking unless asked
        if functions and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": ""}, *messages]
        last_user = max((i for i, m in enumerate(messages) if m["role"] in ("user", "developer")), default=-1)
        out = BOS
        tools_done = False
        for i, m in enumerate(messages):
            role, content = m["role"], m.get("content") or ""
            if role == "system":
                out += content
                if functions and not tools_done:
                    out += "\n\n" + self.tools_prompt(functions)
                    tools_done = True
            elif role in ("user", "developer"):
                out += f"<｜User｜>{content}<｜Assistant｜>"
                out += THINK_START if thinking and i == last_user else THINK_END
            elif role == "tool":
                if i == 0 or messages[i - 1]["role"] != "tool":
                    out += "\n\n<function_results>"
                out += f"\n<result>{content}</result>"
                if i + 1 == len(messages) or messages[i + 1]["role"] != "tool":
                    out += "\n</function_results>\n\n" + (THINK_START if thinking and i > last_user else THINK_END)
            elif role == "assistant":
                reasoning = (m.get("reasoning_content") or "") + THINK_END if thinking and i > last_user else ""
                calls = ""
                if m.get("tool_calls"):
                    body = "\n".join(self.call_text(c["function"]["name"], c["function"]["arguments"] or "{}")
                                     for c in m["tool_calls"])
                    calls = f"\n\n<{DSML}function_calls>\n{body}\n</{DSML}function_calls>"
                out += reasoning + content + calls + EOS
        return out

    def grammar(self, functions, mode, parallel, lit, added) -> str | None:
        if mode == "auto":
            return None  # the DSML trigger starts with "<", which free text must keep: no lazy form
        return super().grammar(functions, mode, parallel, lit, added)

    def _call(self, i, f, schema, closed, lit, rules) -> str:
        head = lit(f'<{DSML}invoke name="{f.name}">\n')
        return f"{head} {_dsml_params(i, schema, lit, rules, closed)} {lit(f'</{DSML}invoke>')}"

    def _calls(self, repeated, multi, lit, rules) -> str:
        rules.append(f"calls: {repeated('fn', lit(chr(10)))} {lit(chr(10) + DSML_END)}")
        return lit(DSML_BEGIN + "\n")


class GenericFormat(ToolFormat):
    """Any other model (e.g. SmolLM2): documented in GENERIC_FORMAT; its template knows no tool turns, so past
    calls become the assistant's own text and results user turns."""

    name, parser_class, trigger = "generic", GenericParser, GENERIC_BEGIN

    @staticmethod
    def speaks(tokenizer: Tokenizer) -> bool:
        return True

    def tools_prompt(self, functions: list[Function]) -> str:
        listing = "\n".join(json.dumps({"type": "function", "function": {
            "name": f.name, "description": f.description or "", "parameters": f.parameters}}, ensure_ascii=False)
            for f in functions)
        return f"# Tools\n\nThese functions are available:\n<tools>\n{listing}\n</tools>\n\n{GENERIC_FORMAT}"

    @staticmethod
    def call_text(name: str, arguments: str) -> str:
        """A past call, as the model writes it."""
        body = f'{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {arguments}}}'
        return f"{GENERIC_BEGIN}\n{body}\n{GENERIC_END}"

    def history(self, messages: list[dict]) -> list[dict]:
        """Runs of tool results merge into one user turn, so user/assistant keep alternating."""
        out: list[dict] = []
        results = False  # the last turn holds tool results
        for m in messages:
            if m["role"] == "assistant" and m.get("tool_calls"):
                calls = "\n".join(self.call_text(c["function"]["name"], c["function"]["arguments"] or "{}")
                                  for c in m["tool_calls"])
                out.append({"role": "assistant", "content": f"{m['content']}\n{calls}" if m.get("content") else calls})
            elif m["role"] == "tool":
                block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
                if results:
                    out[-1]["content"] += "\n" + block
                else:
                    out.append({"role": "user", "content": block})
            else:
                out.append(m)
            results = m["role"] == "tool"
        return out

    def _call(self, i, f, schema, closed, lit, rules) -> str:
        call = {"type": "object", "properties": {"name": {"const": f.name}, "arguments": schema},
                "required": ["name", "arguments"], "additionalProperties": False}
        return json_rule(call, closed)

    def _calls(self, repeated, multi, lit, rules) -> str:
        rules += [f"call: {lit(chr(10))} fn {lit(chr(10) + GENERIC_END)}",
                  f"calls: {repeated('call', lit(chr(10) + GENERIC_BEGIN))}"]
        return lit(GENERIC_BEGIN)


V4_BEGIN, V4_END = f"\n\n<{DSML}tool_calls>", f"</{DSML}tool_calls>"
V4_REMINDER = "<｜latest_reminder｜>"  # a token only V4's vocabulary has (V3.2 also has ｜DSML｜)
V4_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, "
    "rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n")
# DeepSeek's API for V4: low, high (the default), max; medium is high and xhigh max (api.md §2). Only max changes
# the prompt; OpenAI's other spellings read as high.
V4_EFFORTS = {"none": "high", "minimal": "high", "low": "high", "medium": "high", "high": "high", "xhigh": "max",
              "max": "max"}


class DSMLParserV4(DSMLParser):
    """V4: the V3.2 elements inside a `tool_calls` block, which starts after a blank line."""

    triggers = (V4_BEGIN,)
    end = V4_END


class DeepSeekV4Format(DSMLFormat):
    """DeepSeek-V4 (no Jinja template; its Python encoder, encoding_dsv4.py, is reproduced in render()): V3.2's DSML
    parameters in a `<｜DSML｜tool_calls>` block after a blank line; tool results are `<tool_result>` blocks of a user
    turn; thinking is on unless turned off; reasoning_effort max puts DeepSeek's effort preamble first."""

    name, parser_class, trigger = "deepseek_v4", DSMLParserV4, V4_BEGIN

    @staticmethod
    def speaks(tokenizer: Tokenizer) -> bool:
        return DSMLFormat.speaks(tokenizer) and tokenizer.token_to_id(V4_REMINDER) is not None

    def tools_prompt(self, functions: list[Function]) -> str:
        d = DSML
        schemas = "\n".join(json.dumps({"name": f.name, "description": f.description or "", "parameters": f.parameters},
                                       ensure_ascii=False) for f in functions)
        return (
            "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools "
            f'by writing a "<{d}tool_calls>" block like the following:\n\n<{d}tool_calls>\n'
            f'<{d}invoke name="$TOOL_NAME">\n'
            f'<{d}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{d}parameter>\n...\n'
            f'</{d}invoke>\n<{d}invoke name="$TOOL_NAME2">\n...\n</{d}invoke>\n</{d}tool_calls>\n\n'
            'String parameters should be specified as is and set `string="true"`. For all other types (numbers, '
            'booleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
            f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning "
            f"inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n\n"
            f"Otherwise, output directly after {THINK_END} with tool calls or final response.\n\n"
            f"### Available Tool Schemas\n\n{schemas}\n\nYou MUST strictly follow the above defined tool name and "
            "parameter schemas to invoke tool calls.\n")

    @staticmethod
    def call_text(name: str, arguments: str) -> str:
        """A past call, as V4 writes it (arguments that are not a JSON object become one `arguments` string)."""
        try:
            args = json.loads(arguments)
        except json.JSONDecodeError:
            args = {"arguments": arguments}
        params = "\n".join(
            f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
            f"{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}</{DSML}parameter>"
            for k, v in args.items())
        return f'<{DSML}invoke name="{name}">\n{params}\n</{DSML}invoke>'

    def render(self, messages: list[dict], thinking: bool | None, functions: list[Function] | None,
               **options) -> str:
        thinking = thinking is not False  # V4's API: thinking on by default
        effort = options.get("reasoning_effort")
        if effort is not None and effort not in V4_EFFORTS:
            raise ValueError(f"reasoning_effort must be one of {', '.join(V4_EFFORTS)}")
        msgs = self._merge_results(messages, functions)
        drop = not functions  # the encoder keeps every turn's reasoning in a conversation with tools
        last_user = max((i for i, m in enumerate(msgs) if m["role"] in ("user", "developer")), default=-1)
        if thinking and drop:  # earlier turns lose their reasoning; earlier developer turns go
            msgs = [m if i >= last_user or m["role"] != "assistant" else {**m, "reasoning_content": None}
                    for i, m in enumerate(msgs) if i >= last_user or m["role"] != "developer"]
            last_user = max((i for i, m in enumerate(msgs) if m["role"] in ("user", "developer")), default=-1)
        out = BOS + (V4_EFFORT_MAX if thinking and V4_EFFORTS.get(effort) == "max" and msgs else "")
        for i, m in enumerate(msgs):
            role, content = m["role"], m.get("content") or ""
            if role == "system":
                out += content + ("\n\n" + self.tools_prompt(functions) if functions and i == 0 else "")
            elif role == "developer":
                out += "<｜User｜>" + content
            elif role == "user":
                out += "<｜User｜>" + "\n\n".join(m["blocks"])
            else:
                reasoning = (m.get("reasoning_content") or "") + THINK_END if thinking and (
                    not drop or i > last_user) else ""
                calls = ""
                if m.get("tool_calls"):
                    body = "\n".join(self.call_text(c["function"]["name"], c["function"]["arguments"])
                                     for c in m["tool_calls"])
                    calls = f"{V4_BEGIN}\n{body}\n{V4_END}"
                out += reasoning + content + calls + EOS
            if role in ("user", "developer") and (i + 1 == len(msgs) or msgs[i + 1]["role"] == "assistant"):
                out += "<｜Assistant｜>" + (THINK_START if thinking and (not drop or i >= last_user) else THINK_END)
        return out

    @staticmethod
    def _merge_results(messages: list[dict], functions: list[Function] | None) -> list[dict]:
        """V4 has no tool role: results become <tool_result> blocks of a user turn (in the order of the calls
        they answer), and a user turn after them joins that turn; the tools go on a (first) system turn."""
        out: list[dict] = []
        if functions and (not messages or messages[0]["role"] != "system"):
            out.append({"role": "system", "content": ""})
        order: dict[str, int] = {}
        for m in messages:
            if m["role"] in ("tool", "user"):
                block = (f"<tool_result>{m.get('content') or ''}</tool_result>" if m["role"] == "tool"
                         else m.get("content") or "")
                if not (out and out[-1]["role"] == "user"):
                    out.append({"role": "user", "blocks": [], "results": []})
                out[-1]["blocks"].append(block)
                if m["role"] == "tool":
                    out[-1]["results"].append((order.get(m.get("tool_call_id") or "", 0), len(out[-1]["blocks"]) - 1))
                continue
            if m["role"] == "assistant" and m.get("tool_calls"):
                order = {c["id"]: k for k, c in enumerate(m["tool_calls"]) if c.get("id")}
            out.append(m)
        for m in out:
            if m["role"] == "user" and len(m["results"]) > 1:
                slots = [k for _, k in m["results"]]
                ordered = [m["blocks"][k] for _, k in sorted(m["results"], key=lambda r: r[0])]
                for k, block in zip(slots, ordered, strict=True):
                    m["blocks"][k] = block
        return out

    def _calls(self, repeated, multi, lit, rules) -> str:
        rules.append(f"calls: {repeated('fn', lit(chr(10)))} {lit(chr(10) + V4_END)}")
        return lit(V4_BEGIN + "\n")


# generic last: it takes any; V4 before V3.2, whose vocabulary test it also passes
FAMILIES = (DeepSeekV3Format(), DeepSeekV31Format(), DeepSeekV4Format(), DSMLFormat(), GenericFormat())
FORMATS = {f.name: f for f in FAMILIES}


def detect_format(tokenizer: Tokenizer | None, model_type: str | None = None) -> ToolFormat:
    """The family the checkpoint's template (or, for V3.2 and V4, its vocabulary or model type) speaks."""
    if model_type == "deepseek_v4":
        return FORMATS["deepseek_v4"]
    if tokenizer is None:
        return FORMATS["generic"]
    return next(f for f in FAMILIES if f.speaks(tokenizer))


def _dsml_params(i: int, schema: dict, lit: Callable[[str], str], rules: list[str], closed: bool) -> str:
    """One optional-or-required rule per property, in schema order; string values are raw text."""
    props = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
    parts = []
    for j, (key, sub) in enumerate(props.items()):
        is_string = isinstance(sub, dict) and sub.get("type") == "string"
        head = lit(f'<{DSML}parameter name="{key}" string="{"true" if is_string else "false"}">')
        value = "DSML_STR" if is_string else json_rule({**sub, **defs} if isinstance(sub, dict) else {}, closed)
        rules.append(f"p{i}_{j}: {head} {value} {lit(f'</{DSML}parameter>' + chr(10))}")
        parts.append(f"p{i}_{j}" + ("" if key in required else "?"))
    if "DSML_STR: " not in "\n".join(rules):
        rules.append("DSML_STR: /[^<]*/")  # a string value cannot contain "<" (documented limitation)
    return " ".join(parts) or '""'
