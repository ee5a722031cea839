"""Ollama's chat templates: the Go text/template subset its template layers use, rendered as Ollama renders them.

An Ollama model's `template` blob is a Go template, not Jinja. Ollama (template/template.go) executes it with
`.System` (every system message, joined by blank lines), `.Messages` (consecutive messages of one role merged,
tool results kept apart), `.Tools`, `.Response` "" and the thinking switches `.Think` / `.IsThinkSet`. A legacy
template that never names `.Messages` is executed once per exchange with `.System`, `.Prompt` and `.Response`,
and for the last exchange everything after its `{{ .Response }}` is cut away: the model writes the answer there.

The subset: text; `{{ }}` actions with `{{-` / `-}}` whitespace trimming and comments; `if` / `else if` / `else`,
`range` (with `$i, $v :=`), `with`, `end`; variables (`$x := ...`, `$x = ...`, `$`); fields (`.A.B`, `$.A`,
`$v.A`); parenthesized pipelines and `|`; string, number and boolean literals; the functions eq ne lt le gt ge
and or not len index slice print printf println, and Ollama's json and currentDate. Messages and tools are the
JSON shapes of Ollama's API; a Go field name reads its json key (ToolCalls -> tool_calls), and printing an object
prints Go's json.Marshal of it (compact, `<>&` escaped), as Ollama's types do.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GoTemplate", "GoTemplateError", "render_ollama_template"]


class GoTemplateError(ValueError):
    """The template uses syntax or a function outside the supported subset, or fails while executing."""


# ---- lexing ------------------------------------------------------------------------------------------------

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r"""\s*(?:
    (?P<str>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|(?P<num>-?\d+(?:\.\d+)?)|
    (?P<decl>:=)|(?P<assign>=)|(?P<pipe>\|)|(?P<lp>\()|(?P<rp>\))|(?P<comma>,)|
    (?P<var>\$\w*(?:\.\w+)*)|(?P<field>(?:\.\w+)+|\.)|(?P<ident>\w+))""", re.X)


def _tokens(src: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    src = src.strip()
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if m is None or m.end() == pos:
            raise GoTemplateError(f"cannot read {src[pos:pos + 20]!r} in {{{{ {src} }}}}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


# ---- the tree ----------------------------------------------------------------------------------------------


@dataclass
class _Pipeline:
    commands: list[list[Any]]  # each a list of operands: ("ident", name) | ("field", chain) | literal | _Pipeline ...
    decl: list[str] = field(default_factory=list)  # variables declared (:=) or assigned (=)
    assign: bool = False


@dataclass
class _Action:
    pipe: _Pipeline


@dataclass
class _Branch:
    kind: str  # if | range | with
    pipe: _Pipeline
    body: list
    else_body: list | None = None


class _Parser:
    def __init__(self, text: str):
        self.items: list[tuple[str, Any]] = []  # ("text", s) | ("action", token list)
        pos, trim_next = 0, False
        for m in _ACTION.finditer(text):
            chunk = text[pos:m.start()]
            if trim_next:
                chunk = chunk.lstrip()
            if m.group(1):
                chunk = chunk.rstrip()
            self.items.append(("text", chunk))
            inner = m.group(2)
            trim_next = bool(m.group(3))
            if not inner.strip().startswith("/*"):
                self.items.append(("action", _tokens(inner)))
            pos = m.end()
        tail = text[pos:]
        self.items.append(("text", tail.lstrip() if trim_next else tail))
        self.pos = 0

    def parse(self) -> list:
        body, stop = self._list()
        if stop is not None:
            raise GoTemplateError(f"unexpected {{{{ {stop[0][1]} }}}}")
        return body

    def _list(self) -> tuple[list, list | None]:
        """Nodes up to an end/else (returned as the stopping token list) or the end of the template."""
        nodes: list = []
        while self.pos < len(self.items):
            kind, value = self.items[self.pos]
            self.pos += 1
            if kind == "text":
                if value:
                    nodes.append(value)
                continue
            head = value[0][1] if value[0][0] == "ident" else None
            if head in ("end", "else"):
                return nodes, value
            if head in ("if", "range", "with"):
                nodes.append(self._branch(head, value[1:]))
            elif head in ("define", "template", "block", "break", "continue"):
                raise GoTemplateError(f"{{{{ {head} }}}} is not supported")
            else:
                nodes.append(_Action(self._pipeline(value)))
        return nodes, None

    def _branch(self, kind: str, toks: list) -> _Branch:
        node = _Branch(kind, self._pipeline(toks), [])
        node.body, stop = self._list()
        if stop is None:
            raise GoTemplateError(f"{{{{ {kind} }}}} without {{{{ end }}}}")
        if stop[0][1] == "else":
            rest = stop[1:]
            if rest and rest[0] == ("ident", "if"):  # else if: a nested if that shares this end
                node.else_body = [self._branch("if", rest[1:])]
                return node
            node.else_body, stop = self._list()
            if stop is None or stop[0][1] != "end":
                raise GoTemplateError(f"{{{{ {kind} }}}} ... {{{{ else }}}} without {{{{ end }}}}")
        return node

    def _pipeline(self, toks: list) -> _Pipeline:
        decl, assign = [], False
        for i, (kind, _) in enumerate(toks):
            if kind in ("decl", "assign"):
                names = [v for k, v in toks[:i] if k == "var"]
                if len(names) != len([t for t in toks[:i] if t[0] != "comma"]):
                    raise GoTemplateError("only variables can be declared")
                decl, assign, toks = names, kind == "assign", toks[i + 1:]
                break
        cmds, current = [], []
        i = 0
        while i < len(toks):
            kind, value = toks[i]
            if kind == "pipe":
                cmds.append(current)
                current = []
            elif kind == "lp":
                depth, j = 1, i + 1
                while depth:
                    if j >= len(toks):
                        raise GoTemplateError("unclosed (")
                    depth += {"lp": 1, "rp": -1}.get(toks[j][0], 0)
                    j += 1
                inner: Any = self._pipeline(toks[i + 1:j - 1])
                if j < len(toks) and toks[j][0] == "field" and toks[j][1] != ".":  # (pipeline).Field
                    inner = ("chained", inner, toks[j][1])
                    j += 1
                current.append(inner)
                i = j
                continue
            elif kind == "str":
                current.append(("lit", json.loads(value)))
            elif kind == "raw":
                current.append(("lit", value[1:-1]))
            elif kind == "num":
                current.append(("lit", float(value) if "." in value else int(value)))
            elif kind == "ident" and value in ("true", "false", "nil"):
                current.append(("lit", {"true": True, "false": False, "nil": None}[value]))
            elif kind in ("ident", "field", "var"):
                current.append((kind, value))
            else:
                raise GoTemplateError(f"unexpected {value!r}")
            i += 1
        cmds.append(current)
        if any(not c for c in cmds):
            raise GoTemplateError("empty command in a pipeline")
        return _Pipeline(cmds, decl, assign)


# ---- values ------------------------------------------------------------------------------------------------


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z][a-z])|(?<=[a-z])(?=[A-Z])", "_", name).lower()


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        if name in obj:
            return obj[name]
        return obj.get(_snake(name))
    raise GoTemplateError(f"can't evaluate field {name} in a {type(obj).__name__}")


def _truth(v: Any) -> bool:
    return v is not None and v is not False and v != 0 and v != "" and not (isinstance(v, list | dict) and not v)


def go_json(v: Any) -> str:
    """Go's json.Marshal: compact, with <, > and & escaped."""
    s = json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _text(v: Any) -> str:
    if v is None:
        return "<no value>"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict | list):
        return go_json(v)
    return str(v)


def _printf(fmt: str, *args: Any) -> str:
    out = iter(args)
    return re.sub(r"%[vsdq%]", lambda m: "%" if m.group() == "%%" else
                  json.dumps(_text(next(out))) if m.group() == "%q" else _text(next(out)), fmt)


def _slice(v: Any, *idx: int) -> Any:
    return v[idx[0]:idx[1]] if len(idx) == 2 else v[idx[0]:] if idx else v


_FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b, "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
    "not": lambda a: not _truth(a),
    "len": lambda a: len(a) if a is not None else 0,
    "index": lambda a, *keys: _index(a, keys),
    "slice": _slice,
    "print": lambda *a: "".join(_text(x) for x in a),
    "println": lambda *a: " ".join(_text(x) for x in a) + "\n",
    "printf": _printf,
    "json": go_json,
    "currentDate": lambda: datetime.date.today().isoformat(),
}


def _index(a: Any, keys: tuple) -> Any:
    for k in keys:
        a = a.get(k) if isinstance(a, dict) else a[k]
    return a


# ---- execution ---------------------------------------------------------------------------------------------


class GoTemplate:
    """A parsed Go template; render(data) executes it."""

    def __init__(self, text: str):
        self.text = text
        parser = _Parser(text)
        # every field and variable name it mentions, lower-cased (Ollama's Template.Vars)
        self.names = {part.lower() for kind, toks in parser.items if kind == "action" for k, v in toks
                      if k in ("field", "var") for part in re.findall(r"\w+", v)}
        self.root = parser.parse()

    def render(self, data: dict[str, Any], cut_after_response: bool = False) -> str:
        out: list[str] = []
        root = _cut(self.root) if cut_after_response else self.root
        self._run(root, data, [{"$": data}], out)
        return "".join(out)

    def _run(self, nodes: list, dot: Any, scopes: list[dict], out: list[str]) -> None:
        for node in nodes:
            if isinstance(node, str):
                out.append(node)
            elif isinstance(node, _Action):
                value = self._pipe(node.pipe, dot, scopes)
                if not node.pipe.decl:
                    out.append(_text(value))
            else:
                self._branch(node, dot, scopes, out)

    def _branch(self, node: _Branch, dot: Any, scopes: list[dict], out: list[str]) -> None:
        inner = [*scopes, {}]
        if node.kind == "range":
            value = self._eval_pipe(node.pipe, dot, inner)
            items = sorted(value.items()) if isinstance(value, dict) else list(enumerate(value or []))
            if not items:
                if node.else_body is not None:
                    self._run(node.else_body, dot, [*scopes, {}], out)
                return
            for k, v in items:
                loop = [*scopes, {}]
                if len(node.pipe.decl) == 2:
                    loop[-1][node.pipe.decl[0]], loop[-1][node.pipe.decl[1]] = k, v
                elif node.pipe.decl:
                    loop[-1][node.pipe.decl[0]] = v
                self._run(node.body, v, loop, out)
            return
        value = self._pipe(node.pipe, dot, inner)
        if _truth(value):
            self._run(node.body, value if node.kind == "with" else dot, inner, out)
        elif node.else_body is not None:
            self._run(node.else_body, dot, [*scopes, {}], out)

    def _eval_pipe(self, pipe: _Pipeline, dot: Any, scopes: list[dict]) -> Any:
        """A pipeline's value without its declaration (range declares per item)."""
        return self._pipe(_Pipeline(pipe.commands), dot, scopes)

    def _pipe(self, pipe: _Pipeline, dot: Any, scopes: list[dict]) -> Any:
        value, first = None, True
        for cmd in pipe.commands:
            value = self._command(cmd, dot, scopes, None if first else (value,))
            first = False
        if pipe.decl:
            name = pipe.decl[-1]
            if pipe.assign:
                target = next((s for s in reversed(scopes) if name in s), None)
                if target is None:
                    raise GoTemplateError(f"undefined variable {name}")
                target[name] = value
            else:
                scopes[-1][name] = value
        return value

    def _command(self, cmd: list, dot: Any, scopes: list[dict], piped: tuple | None) -> Any:
        head = cmd[0]
        if isinstance(head, tuple) and head[0] == "ident":
            fn = _FUNCS.get(head[1])
            if fn is None and head[1] not in ("and", "or"):
                raise GoTemplateError(f'function "{head[1]}" not defined')
            if head[1] in ("and", "or"):  # short-circuit, returning the deciding operand
                args = [*(self._operand(a, dot, scopes) for a in cmd[1:]), *(piped or ())]
                for a in args:
                    if _truth(a) != (head[1] == "and"):
                        return a
                return args[-1]
            args = [self._operand(a, dot, scopes) for a in cmd[1:]] + list(piped or ())
            try:
                return fn(*args)
            except (TypeError, IndexError, KeyError) as e:
                raise GoTemplateError(f"error calling {head[1]}: {e}") from None
        if len(cmd) > 1 or piped:
            raise GoTemplateError(f"{head} is not a function")
        return self._operand(head, dot, scopes)

    def _operand(self, op: Any, dot: Any, scopes: list[dict]) -> Any:
        if isinstance(op, _Pipeline):
            return self._pipe(op, dot, scopes)
        kind, value = op[0], op[1]
        if kind == "lit":
            return value
        if kind == "chained":
            return self._fields(self._pipe(value, dot, scopes), op[2])
        if kind == "field":
            return dot if value == "." else self._fields(dot, value)
        if kind == "var":
            name, _, rest = value.partition(".")
            for s in reversed(scopes):
                if name in s:
                    return self._fields(s[name], "." + rest) if rest else s[name]
            raise GoTemplateError(f"undefined variable {name}")
        if kind == "ident":
            fn = _FUNCS.get(value)
            if fn is None:
                raise GoTemplateError(f'function "{value}" not defined')
            return fn()
        raise GoTemplateError(f"unexpected {value!r}")

    @staticmethod
    def _fields(obj: Any, chain: str) -> Any:
        for name in chain.strip(".").split("."):
            obj = _get(obj, name)
        return obj


def _cut(nodes: list) -> list:
    """Ollama's legacy cut: the tree up to and including the first `{{ .Response }}`; nothing after it."""
    state = {"cut": False}

    def walk(ns: list) -> list:
        kept = []
        for n in ns:
            if state["cut"]:
                break
            if isinstance(n, _Branch):
                n = _Branch(n.kind, n.pipe, walk(n.body), walk(n.else_body) if n.else_body is not None else None)
            elif isinstance(n, _Action) and any(isinstance(a, tuple) and a[0] == "field" and "Response" in
                                                 a[1].split(".") for c in n.pipe.commands for a in c):
                state["cut"] = True
            kept.append(n)
        return kept

    return walk(nodes)


# ---- Ollama's values ---------------------------------------------------------------------------------------


def _message(m: dict) -> dict:
    """An OpenAI-shaped chat message as Ollama's api.Message (its json keys; arguments as objects)."""
    calls = []
    for c in m.get("tool_calls") or []:
        f = c.get("function", c)
        args = f.get("arguments") or {}
        args = json.loads(args) if isinstance(args, str) else args
        calls.append({"function": {"name": f["name"], "arguments": dict(sorted(args.items()))}})  # a Go map: sorted
    return {"role": m["role"], "content": m.get("content") or "", "thinking": m.get("reasoning_content") or "",
           "images": None, "tool_calls": calls or None, "tool_name": m.get("name") or "",
           "tool_call_id": m.get("tool_call_id") or ""}


def _tool(t: dict) -> dict:
    """An OpenAI-shaped tool as Ollama's api.Tool, fields in its struct order (what json.Marshal prints)."""
    f = t.get("function", t)
    p = f.get("parameters") or {}
    props = {name: {k: v for k, v in (("type", s.get("type")), ("items", s.get("items")),
                                      ("description", s.get("description")), ("enum", s.get("enum"))) if v}
             for name, s in sorted((p.get("properties") or {}).items())}
    params = {"type": p.get("type", "object"), "required": p.get("required"), "properties": props}
    fn = {"name": f["name"], "description": f.get("description") or "", "parameters": params}
    return {"type": t.get("type", "function"), "function": fn}


def render_ollama_template(template: str | GoTemplate, messages: list[dict], tools: list[dict] | None = None,
                           think: bool | None = None) -> str:
    """The prompt Ollama builds for `messages` (OpenAI-shaped dicts) with a Go template layer."""
    t = template if isinstance(template, GoTemplate) else GoTemplate(template)
    collated: list[dict] = []
    for m in map(_message, messages):
        if collated and collated[-1]["role"] == m["role"] and m["role"] != "tool":
            collated[-1] = {**collated[-1], "content": collated[-1]["content"] + "\n\n" + m["content"]}
            continue
        collated.append(m)
    system = "\n\n".join(m["content"] for m in collated if m["role"] == "system")
    if "messages" in t.names:
        return t.render({"System": system, "Messages": collated, "Tools": [_tool(x) for x in tools or []] or None,
                         "Response": "", "Think": bool(think), "ThinkLevel": "", "IsThinkSet": think is not None})
    out, system, prompt, response = [], "", "", ""
    for m in collated:
        if m["role"] == "system":
            if prompt or response:
                out.append(t.render({"System": system, "Prompt": prompt, "Response": response}))
                prompt = response = ""
            system = m["content"]
        elif m["role"] == "user":
            if response:
                out.append(t.render({"System": system, "Prompt": prompt, "Response": response}))
                system = prompt = response = ""
            prompt = m["content"]
        elif m["role"] == "assistant":
            response = m["content"]
    out.append(t.render({"System": system, "Prompt": prompt, "Response": response}, cut_after_response=True))
    return "".join(out)
