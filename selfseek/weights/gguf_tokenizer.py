"""A tokenizer from GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).

A GGUF has no tokenizer.json: it stores the byte-level BPE vocabulary and merges, a type per token and
the special ids. We rebuild the tokenizer.json the model was released with: the BPE model, the added
tokens at their own ids, and the pre-tokenizer that `tokenizer.ggml.pre` names (the split the merges
were learned on; a wrong one still encodes, just into different tokens than the model was trained on).

Token types (llama.cpp's llama_token_type): 1 normal, 2 unknown, 3 control (special), 4 user-defined
(an added token that is not special, e.g. DeepSeek-LLM's "ö"), 5 unused, 6 byte. llama.cpp's converter
writes an added token by its text and marks `<|...|>` / `<｜...｜>` ones control even when the
checkpoint did not flag them special (Coder's <|EOT|>); both kinds are matched whole in the text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import tokenizers

from selfseek.tokenizer import Tokenizer
from selfseek.weights.gguf_pretokenizers import (
    CUSTOM_PATTERNS,
    IGNORE_MERGES,
    IGNORE_MERGES_NAMES,
    LLAMA_CPP_PRE_NAMES,
    LLAMA_CPP_REGEXES,
    NOT_BYTE_LEVEL,
)

__all__ = ["PRE_TOKENIZERS", "tokenizer_from_gguf"]

_CONTROL, _USER_DEFINED = 3, 4


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


_BYTES_ONLY = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
# ByteLevel with its own regex: GPT-2's 's|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
_GPT2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_DIGITS = {"type": "Digits", "individual_digits": True}

# The pre-tokenizers of the released tokenizer.json files, by llama.cpp's `tokenizer.ggml.pre` name
# (llama.cpp ports the same regexes into src/llama-vocab.cpp). Non-ASCII characters are escaped: several
# of them (e.g. U+1F7D, U+2126, U+212A) have canonical equivalents that an editor's normalization would
# silently substitute, and that breaks the character ranges.
_DEEPSEEK_LLM_LETTERS = (
    "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376"
    "\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
    "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
    "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb"
    "\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
    "\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+"
)
_DEEPSEEK_LLM_PUNCT = "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_DEEPSEEK_V3 = [
    _split("\\p{N}{1,3}"),
    _split("[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"),
    _split(
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
        "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
    ),
    _BYTES_ONLY,
]
PRE_TOKENIZERS: dict[str, list[dict]] = {
    # DeepSeek-LLM 7B/67B, V2, V2.5, Coder-V2
    "deepseek-llm": [_split("[\r\n]"), _split(_DEEPSEEK_LLM_LETTERS), _split(_DEEPSEEK_LLM_PUNCT),
                     _split("\\s+$"), _split(_CJK), _DIGITS, _BYTES_ONLY],
    # DeepSeek-Coder 1.3B/6.7B/33B
    "deepseek-coder": [_split("[\r\n]"), _split("\\s?\\p{L}+"), _split("\\s?\\p{P}+"), _split(_CJK), _DIGITS,
                       _BYTES_ONLY],
    # V3, R1, V3.1, V3.2
    "deepseek-v3": _DEEPSEEK_V3,
    # Llama 3 and R1-Distill-Llama
    "llama-bpe": [_split(_LLAMA3), _BYTES_ONLY],
    "llama3": [_split(_LLAMA3), _BYTES_ONLY],
    "llama-v3": [_split(_LLAMA3), _BYTES_ONLY],
    # SmolLM / SmolLM2: single digits, then GPT-2's split
    "smollm": [_DIGITS, _GPT2],
    "gpt-2": [_GPT2],
    # llama.cpp's "default" is a legacy regex set of its own; GPT-2's split is what the HF side gives
    "default": [_GPT2],
}
# DeepSeek-V3's tokenizer under the name current llama.cpp converters give it (JoyAI-LLM reuses it).
PRE_TOKENIZERS["joyai-llm"] = _DEEPSEEK_V3
# Pre-tokenizers whose vocabularies take a pre-token found whole in the vocabulary as is (tokenizer.json
# `ignore_merges`), and for which llama.cpp adds BOS when the file does not say.
_LLAMA3_NAMES = {"llama-bpe", "llama3", "llama-v3"}


def pre_tokenizer(pre: str, source: str = "GGUF") -> list[dict]:
    """The tokenizers pre-tokenizer steps for llama.cpp's `tokenizer.ggml.pre` name: the released tokenizer.json's
    own for the DeepSeek / Llama 3 / SmolLM names above, else llama.cpp's regexes for the name, each a Split."""
    if pre in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[pre]
    kind = LLAMA_CPP_PRE_NAMES.get(pre)
    if kind is None:
        raise ValueError(f"{source}: unknown pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: "
                         f"{', '.join(sorted(set(PRE_TOKENIZERS) | set(LLAMA_CPP_PRE_NAMES)))}")
    if kind in NOT_BYTE_LEVEL:
        raise ValueError(f"{source}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is for a raw UTF-8 vocabulary, not "
                         "byte-level BPE; not supported")
    return [_split(CUSTOM_PATTERNS.get(r, r)) for r in LLAMA_CPP_REGEXES[kind]] + [_BYTES_ONLY]


def _ignore_merges(pre: str) -> bool:
    return (pre in _LLAMA3_NAMES or pre in IGNORE_MERGES_NAMES
            or (pre not in PRE_TOKENIZERS and LLAMA_CPP_PRE_NAMES.get(pre) in IGNORE_MERGES))


def tokenizer_from_gguf(metadata: Mapping[str, Any], source: str = "GGUF") -> Tokenizer | None:
    """The file's tokenizer, or None when it carries none. `source` names the file in errors."""
    model = metadata.get("tokenizer.ggml.model")
    if model is None:
        return None
    if model != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model {model!r} is not supported (only 'gpt2': byte-level BPE)")
    pre = metadata.get("tokenizer.ggml.pre") or "default"
    pre_steps = pre_tokenizer(pre, source)
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges: list[str] = metadata.get("tokenizer.ggml.merges") or []
    if len(types) != len(tokens):
        raise ValueError(f"{source}: {len(tokens)} tokens but {len(types)} token types")

    vocab: dict[str, int] = {}
    added = []
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind in (_CONTROL, _USER_DEFINED):
            added.append({"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": kind == _CONTROL})
        vocab.setdefault(tok, i)  # a repeated string keeps its first id, as a dict-based vocabulary must
    for a in added:
        # The tokenizers library gives an added token the id its text has in the model vocabulary, or else
        # the next free id past it, whatever id the added token declares; so each must own its text there.
        if vocab[a["content"]] != a["id"]:
            raise ValueError(f"{source}: added token {a['content']!r} (id {a['id']}) has the same text as token "
                             f"{vocab[a['content']]}")
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_steps},
        "post_processor": None,  # BOS comes from selfseek.Tokenizer's add_bos_token rule
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": _ignore_merges(pre), "vocab": vocab, "merges": merges},
    }
    try:
        hf = tokenizers.Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # tokenizers raises plain Exception on a malformed vocabulary
        raise ValueError(f"{source}: cannot build the tokenizer from its GGUF vocabulary ({e})") from None

    def token(key: str) -> str | None:
        i = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config: dict[str, Any] = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"),
        "unk_token": token("unknown_token_id"),
        # llama.cpp's default when the file does not say: BOS for Llama-3 vocabularies, none for other BPE.
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", pre in _LLAMA3_NAMES)),
    }
    if metadata.get("tokenizer.chat_template") is not None:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    # End-of-turn / end-of-message ids stop generation like EOS (llama.cpp's eot and eom).
    stops = [metadata[f"tokenizer.ggml.{k}"] for k in ("eos_token_id", "eot_token_id", "eom_token_id")
             if metadata.get(f"tokenizer.ggml.{k}") is not None]
    return Tokenizer.from_parts(hf, config, stops)
