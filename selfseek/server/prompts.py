"""Chat messages -> prompt text: the checkpoint's chat template, plus what the templates leave out.

- Tools: DeepSeek's V3/R1/V3.1 templates render tool calls and results in the history but not the list of
  tools, so that list (the family's ToolFormat.tools_prompt) joins the system prompt. A template without a
  tool format at all gets the generic family, whose history() writes past calls and results as text.
- V3.2 ships no Jinja template; its family renders the whole prompt (tools.DSMLFormat, architecture.md §10.4).
- Chat prefix completion (DeepSeek's `prefix: true`): the conversation before the prefix message is
  rendered with the generation prompt, then the prefix is appended open-ended, so every template works.
  With reasoning open, the message's `reasoning_content` continues the thought and its `content`, if
  any, comes after "</think>".
"""

from __future__ import annotations

from dataclasses import dataclass

from selfseek.server.reasoning import THINK_END, THINK_START
from selfseek.server.tools import Function, ToolFormat
from selfseek.tokenizer import Tokenizer, UntrustedText


@dataclass
class ChatPrompt:
    text: str  # as the model reads it
    reasoning_open: bool  # the text ends inside a <think> block: the output starts as reasoning
    untrusted: UntrustedText | None = None  # the caller's control strings, kept as text by encode()
    rendered: str = ""  # `text` with those strings as placeholders

    def encode(self, tokenizer: Tokenizer) -> list[int]:
        """Token ids: control tokens only where the template (not the caller's strings) wrote them."""
        if self.untrusted is None:
            return tokenizer.encode(self.text)
        return self.untrusted.encode(self.rendered)


def render_chat(
    tokenizer: Tokenizer,
    fmt: ToolFormat,
    messages: list[dict],
    functions: list[Function] | None = None,
    thinking: bool | None = None,
    template_kwargs: dict | None = None,
    prefix: dict | None = None,
    supports_thinking: bool = False,
    trust_control_tokens: bool = False,
) -> ChatPrompt:
    """messages: dicts with role, content (str or None), and for assistants reasoning_content and
    tool_calls ([{id, type, function: {name, arguments (str)}}]); tools: {tool_call_id, content}.
    Control-token strings in any of the caller's values stay text unless `trust_control_tokens`."""
    untrusted = None if trust_control_tokens else UntrustedText(tokenizer)
    if untrusted is not None:
        # an assistant turn's think markers stay markup: templates split a past answer's reasoning off at them
        messages = [untrusted.hide(m, (THINK_START, THINK_END) if m.get("role") == "assistant" else ())
                    for m in messages]
        functions = [Function(untrusted.hide(f.name), untrusted.hide(f.description), untrusted.hide(f.parameters),
                              f.strict) for f in functions] if functions else functions
        template_kwargs = untrusted.hide(template_kwargs)
        prefix = untrusted.hide(prefix)
    messages = fmt.history([dict(m) for m in messages])
    if fmt.own_prompt and not tokenizer.chat_template:
        text = fmt.render(messages, thinking, functions, **(template_kwargs or {}))
    else:
        if functions and "tools" not in (tokenizer.chat_template or ""):
            messages = _with_system(messages, fmt.tools_prompt(functions))
        kwargs = {} if thinking is None else {"thinking": thinking, "enable_thinking": thinking}
        kwargs |= template_kwargs or {}
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tools=_openai_tools(functions) if functions else None, **kwargs
        )
    reasoning_open = supports_thinking and text.rstrip().endswith(THINK_START)
    if prefix is not None:
        if reasoning_open:
            text += prefix.get("reasoning_content") or ""
            if prefix.get("content"):
                text += THINK_END + prefix["content"]
                reasoning_open = False
        else:
            text += prefix.get("content") or ""
    if untrusted is None:
        return ChatPrompt(text, reasoning_open)
    return ChatPrompt(untrusted.reveal(text), reasoning_open, untrusted, text)


def _openai_tools(functions: list[Function]) -> list[dict]:
    return [{"type": "function", "function": {"name": f.name, "description": f.description or "",
                                              "parameters": f.parameters}} for f in functions]


def _with_system(messages: list[dict], extra: str) -> list[dict]:
    """Append `extra` to the first system message, or start the conversation with one."""
    for m in messages:
        if m["role"] == "system":
            m["content"] = f"{m['content']}\n\n{extra}" if m.get("content") else extra
            return messages
    return [{"role": "system", "content": extra}, *messages]
