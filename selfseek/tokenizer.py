"""Tokenizer, chat template rendering and streaming detokenization for DeepSeek checkpoints.

Built on the `tokenizers` library (the checkpoint's tokenizer.json) and `jinja2` (its chat template);
transformers is not needed at run time. The tests check every result against transformers.

BOS rule. DeepSeek's tokenizer_config.json files say `add_bos_token: true` (V3.2: false), but their
tokenizer.json post-processor is a bare ByteLevel that adds nothing: transformers 4's LlamaTokenizerFast
turned `add_bos_token` into a BOS-adding post-processor when it loaded them, and DeepSeek's own examples
(`tokenizer(text)` for base-model completion) rely on that. transformers 5 ignores `add_bos_token` when
a tokenizer.json exists and so drops the BOS. We follow the config, as DeepSeek intended: one BOS when
`add_bos_token` is true, none when false, and never a second one when the text already starts with BOS
(a rendered chat template writes `bos_token` itself).

Added tokens decode to their own text. DeepSeek-LLM and Coder v1 have non-special added tokens for Latin-1
letters (ö, ü, ú, ...): "ö" in a text encodes to such a token, but the tokenizers library passes added
tokens through the ByteLevel decoder, which reads "ö" as the byte 0xF6 and yields U+FFFD (tokenizers
#1392/#1424, acknowledged by DeepSeek as a decoding bug). transformers inherits that; we decode them as text.

Chat messages reach the template as given. transformers 5 drops keys whose value is None, which breaks
DeepSeek's V3/R1/V3.1 templates: they pick the tool-call branch with `message['content'] is none`, and
with the key gone they raise on the undefined content instead.

Role injection. An added token's text inside a string always encodes to that token, so a chat message
holding "<｜User｜>" or "<|im_start|>system" would forge a turn. UntrustedText keeps control tokens to what the
template itself writes: before rendering, control strings in the caller's strings are swapped for
placeholders (private-use characters the caller cannot send, since theirs are swapped too); after rendering,
the text between placeholders is encoded as usual and each placeholder as plain text (the tokenizer with no
added tokens). A prompt with no control strings in its messages encodes exactly as before.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["Tokenizer", "IncrementalDetokenizer", "UntrustedText"]

_REPLACEMENT = "\ufffd"

# End-of-turn markers of DeepSeek (<|EOT|>: Coder instruct, V3 family) and of the Llama / Qwen bases
# that R1 was distilled into. Generation stops on them as on EOS when they are atomic added tokens.
_END_OF_TURN_TOKENS = ("<|EOT|>", "<|eot_id|>", "<|im_end|>", "<|endoftext|>")


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken dict, or null."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _as_id_list(value: Any) -> list[int]:
    """generation_config/config eos_token_id: an int, a list of ints, or missing."""
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode with the BOS rule, special tokens, chat template."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: dict, extra_stop_ids: Iterable[int] = ()):
        self._tk = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

        self.bos_token: str | None = _token_content(config.get("bos_token"))
        self.eos_token: str | None = _token_content(config.get("eos_token"))
        self.pad_token: str | None = _token_content(config.get("pad_token"))
        self.unk_token: str | None = _token_content(config.get("unk_token"))
        self.bos_id: int | None = self._special_id("bos_token", self.bos_token)
        self.eos_id: int | None = self._special_id("eos_token", self.eos_token)

        extra_stop_ids = list(extra_stop_ids)
        if self.eos_id is None and extra_stop_ids:
            # No eos_token in the tokenizer config: the generation config's first EOS stands in.
            self.eos_id = extra_stop_ids[0]
            self.eos_token = self.id_to_token(self.eos_id)

        if "add_bos_token" in config:
            self.add_bos: bool = bool(config["add_bos_token"])
        else:
            # No explicit rule: do what the tokenizer.json post-processor does.
            with_specials = tokenizer.encode("", add_special_tokens=True).ids
            self.add_bos = self.bos_id is not None and with_specials[:1] == [self.bos_id]
        if self.add_bos and self.bos_id is None:
            raise ValueError("add_bos_token is true but the tokenizer has no bos_token")

        added = {tok.content: i for i, tok in tokenizer.get_added_tokens_decoder().items()}
        self.stop_ids: set[int] = {i for i in [self.eos_id, *extra_stop_ids] if i is not None}
        # Added tokens only: an added token is atomic, so it cannot be a piece of ordinary text. Coder's
        # <|EOT|> is not flagged special, yet it is the instruct models' EOS.
        self.stop_ids |= {added[t] for t in _END_OF_TURN_TOKENS if t in added}

        # Added tokens the ByteLevel decoder garbles (module docstring), decoded as their content instead.
        self._literal: dict[int, str] = {}
        self._literal_special: set[int] = set()
        if isinstance(tokenizer.decoder, tokenizers.decoders.ByteLevel):
            for i, tok in tokenizer.get_added_tokens_decoder().items():
                if tokenizer.decode([i], skip_special_tokens=False) != tok.content:
                    self._literal[i] = tok.content
                    if tok.special:
                        self._literal_special.add(i)

        self._templates = self._read_templates(config.get("chat_template"))
        self.chat_template: str | None = self._templates.get("default")
        self._compiled: dict[str, jinja2.Template] = {}
        self.go_template = None  # an Ollama template layer that renders chats instead (use_go_template)

    def use_go_template(self, text: str) -> None:
        """Render chats with an Ollama template layer (Go text/template, selfseek/ollama_template.py) instead of
        a Jinja template; `chat_template` becomes its text."""
        from selfseek.ollama_template import GoTemplate

        self.go_template = GoTemplate(text)
        self.chat_template = text

    def _special_id(self, name: str, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self._tk.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @staticmethod
    def _read_templates(value: Any) -> dict[str, str]:
        # A plain string, or transformers' list of named templates ("default", "tool_use", ...).
        if value is None:
            return {}
        if isinstance(value, str):
            return {"default": value}
        return {entry["name"]: entry["template"] for entry in value}

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json plus, when present, tokenizer_config.json, chat_template.jinja
        (which wins over the config's template, as in transformers) and the EOS ids of
        generation_config.json / config.json."""
        path = Path(path)
        tokenizer = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        if (path / "chat_template.jinja").is_file():
            config["chat_template"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        elif (path / "chat_template.json").is_file():
            config["chat_template"] = _read_json(path / "chat_template.json")["chat_template"]
        stop_ids = _as_id_list(_read_json(path / "generation_config.json").get("eos_token_id"))
        stop_ids += _as_id_list(_read_json(path / "config.json").get("eos_token_id"))
        return cls(tokenizer, config, stop_ids)

    @classmethod
    def from_parts(
        cls, tokenizer: tokenizers.Tokenizer, config: dict, extra_stop_ids: Iterable[int] = ()
    ) -> Tokenizer:
        """Build from an in-memory tokenizer and a tokenizer_config-like dict (e.g. from GGUF metadata)."""
        return cls(tokenizer, config, extra_stop_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, the BOS rule (module docstring) applies.
        Special-token strings inside the text always become their special tokens."""
        # The post-processor is skipped so that BOS comes from our rule alone.
        ids = self._tk.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = list(ids)
        if self._literal.keys().isdisjoint(ids):
            return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)
        # Decode the runs between literal tokens apart. That equals decoding all the bytes at once: a
        # literal's text is whole UTF-8 characters, and no character can span one.
        skip = skip_special_tokens
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id not in self._literal:
                run.append(token_id)
            elif not (skip and token_id in self._literal_special):
                parts += [self._tk.decode(run, skip_special_tokens=skip), self._literal[token_id]]
                run = []
        parts.append(self._tk.decode(run, skip_special_tokens=skip))
        return "".join(parts)

    def token_to_id(self, tok: str) -> int | None:
        return self._tk.token_to_id(tok)

    def id_to_token(self, i: int) -> str | None:
        return self._tk.id_to_token(i)

    @property
    def control_strings(self) -> list[str]:
        """Texts of the added tokens that are markup: special ones, and <...> / [...] ones (DeepSeek's
        <｜User｜> and tool markers are not flagged special). Single-letter added tokens (DeepSeek-LLM's ö, ü)
        are text. Longest first, so a regex alternation prefers the whole marker."""
        if not hasattr(self, "_control"):
            found = {t.content for t in self._tk.get_added_tokens_decoder().values()
                     if t.special or (len(t.content) >= 3 and t.content[0] in "<[" and t.content[-1] in ">]")}
            self._control = sorted(found, key=len, reverse=True)
        return self._control

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` with no added token matched: control strings become ordinary text tokens."""
        with _PLAIN_LOCK:
            if not hasattr(self, "_plain"):
                data = json.loads(self._tk.to_str())
                data["added_tokens"] = []
                self._plain = tokenizers.Tokenizer.from_str(json.dumps(data))
        return self._plain.encode(text, add_special_tokens=False).ids

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render `messages` with the checkpoint's Jinja chat template, as transformers does.

        `template_kwargs` reach the template as variables (e.g. V3.1's `thinking=True`) and override
        bos_token/eos_token/pad_token/unk_token. The templates write BOS themselves, and encode() never
        adds a second one, so the result encodes the same with or without add_special_tokens.
        """
        if self.go_template is not None:
            from selfseek.ollama_template import render_ollama_template

            think = template_kwargs.get("thinking", template_kwargs.get("enable_thinking"))
            return render_ollama_template(self.go_template, messages, tools, think)
        name = "tool_use" if tools is not None and "tool_use" in self._templates else "default"
        if name not in self._templates:
            raise ValueError(
                "this tokenizer has no chat template (no 'chat_template' in tokenizer_config.json and no "
                "chat_template.jinja). Base models have none, and DeepSeek-V3.2 and later ship a Python "
                "encoder instead of a Jinja template: build the prompt text yourself and call encode()."
            )
        if name not in self._compiled:
            self._compiled[name] = _jinja_env().from_string(self._templates[name])
        special = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
        }
        variables = {k: v for k, v in special.items() if v is not None}  # unset ones stay undefined
        variables |= {"documents": None, **template_kwargs}
        return self._compiled[name].render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **variables
        )


_PLAIN_LOCK = threading.Lock()
_OPEN, _CLOSE = "\ue000", "\ue001"  # placeholder brackets: private-use characters
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


class UntrustedText:
    """The caller's strings of one prompt, with their control strings kept out of the control tokens
    (module docstring, "Role injection"). hide() every caller-supplied value before rendering the template,
    then encode() the rendered text."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.found: list[str] = []
        if not hasattr(tokenizer, "_control_pattern"):
            # the placeholder's own opening character is hidden too, so no caller can write a placeholder
            control = [*tokenizer.control_strings, _OPEN]
            tokenizer._control_pattern = re.compile("|".join(re.escape(c) for c in control))
            tokenizer._control_initials = "".join(sorted({c[0] for c in control}))
        self._pattern, self._initials = tokenizer._control_pattern, tokenizer._control_initials

    def hide(self, value: Any, keep: Iterable[str] = ()) -> Any:
        """`value` (a string, or dicts and lists of them) with every control string but those in `keep`
        swapped for a placeholder."""
        if isinstance(value, str):
            if not any(c in value for c in self._initials):  # the common case, at C speed
                return value
            keep = frozenset(keep)
            return self._pattern.sub(lambda m: m.group(0) if m.group(0) in keep else self._swap(m), value)
        if isinstance(value, dict):
            return {k: self.hide(v, keep) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.hide(v, keep) for v in value]
        return value

    def _swap(self, match: re.Match) -> str:
        self.found.append(match.group(0))
        return f"{_OPEN}{len(self.found) - 1}{_CLOSE}"

    def reveal(self, text: str) -> str:
        """The rendered text as the model reads it: placeholders back to the caller's strings."""
        if not self.found:
            return text
        return _PLACEHOLDER.sub(lambda m: self.found[int(m.group(1))], text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of rendered `text`: the template's control strings as control tokens, the caller's as text."""
        tok = self.tokenizer
        if not self.found:
            return tok.encode(text, add_special_tokens)
        ids: list[int] = []
        for i, piece in enumerate(_PLACEHOLDER.split(text)):  # text, index, text, index, ..., text
            if i % 2:
                ids += tok.encode_plain(self.found[int(piece)])
            elif piece:
                ids += tok.encode(piece, add_special_tokens=False)
        if add_special_tokens and tok.add_bos and ids[:1] != [tok.bos_id]:
            ids.insert(0, tok.bos_id)
        return ids


# ---- Jinja environment, matching transformers' (utils/chat_template_utils.py) ----


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes, closing a path to Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        for name in dict(*args, **kwargs):
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, *args, **kwargs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _jinja_env() -> ImmutableSandboxedEnvironment:
    # Chat templates come with downloaded checkpoints: untrusted code, hence the sandbox.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


# ---- Streaming detokenization ----


class IncrementalDetokenizer:
    """Turns a stream of token ids into text chunks whose concatenation equals the full decode.

    Prefix/read offsets as in vLLM and TGI: each step decodes only ids[prefix_offset:], a window that
    starts a few tokens back, and emits what the new tokens added to it. The window has context on its
    left because some decoders (leading-space handling) decode a token differently at the start of a
    sequence. While the window's text ends with U+FFFD, the last tokens may be the first bytes of a
    multi-byte character, so they are held back until it completes.
    """

    # Tokens of prompt context the first window starts with (vLLM uses the same).
    _PROMPT_CONTEXT = 5
    # A UTF-8 character has at most 4 bytes and each token at least one, so more held tokens than
    # this means the window also holds bytes that are really invalid: flush those (see add()).
    _MAX_HELD = 4

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = False
    ):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids)
        self.text = ""
        self._read = len(self._ids)
        self._prefix = max(0, self._read - self._PROMPT_CONTEXT)
        # A prompt that ends inside a character: that character belongs to the output, which completes it.
        for _ in range(3):  # an unfinished character spans at most 3 tokens
            if self._read == self._prefix:
                break
            if not self._decode(self._prefix, self._read).endswith(_REPLACEMENT):
                break
            self._read -= 1
        self._prefix_len = len(self._decode(self._prefix, self._read))

    def _decode(self, start: int, stop: int) -> str:
        return self._tokenizer.decode(self._ids[start:stop], skip_special_tokens=self._skip)

    def _advance(self, window_text: str, stop: int) -> str:
        """Emit window_text past the prefix and move the window so that `stop` is the new read offset."""
        delta = window_text[self._prefix_len :]
        self._prefix, self._read = self._read, stop
        self._prefix_len = len(self._decode(self._prefix, self._read))
        self.text += delta
        return delta

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completed (often '', e.g. mid-character)."""
        self._ids.append(token_id)
        end = len(self._ids)
        window = self._decode(self._prefix, end)
        if not window.endswith(_REPLACEMENT):
            if len(window) > self._prefix_len:
                return self._advance(window, end)
            # The tokens since the read offset add no text: skipped special tokens or ids past the
            # vocabulary, which the full decode drops as well. Drop them too, so the window stays small
            # and keeps its left context.
            del self._ids[self._read :]
            return ""
        if end - self._read > self._MAX_HELD:
            # Invalid bytes would otherwise grow the window without bound. If the window splits cleanly
            # before its newest token (decoding the two halves apart changes nothing) and that token adds
            # text (so bytes follow the split), everything before the split is final: those U+FFFD are in
            # the full decode too. Only the newest token stays held.
            head, tail = self._decode(self._prefix, end - 1), self._decode(end - 1, end)
            if tail and len(head) > self._prefix_len and head + tail == window:
                return self._advance(head, end - 1)
        return ""

    def flush(self) -> str:
        """The held-back rest at the end of the stream (a U+FFFD here is in the full decode too)."""
        window = self._decode(self._prefix, len(self._ids))
        return self._advance(window, len(self._ids)) if len(window) > self._prefix_len else ""
