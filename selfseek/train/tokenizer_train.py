"""Train a byte-level BPE tokenizer with DeepSeek's special tokens and a V3-style chat template.

The pre-tokenizer is DeepSeek-Coder's (newlines, letter runs, punctuation runs and CJK split apart, digits
one by one), so numbers tokenize digit by digit, which small models need for arithmetic. Special tokens
take the first ids as in V3: BOS 0, EOS 1, PAD 2. Special strings use the fullwidth ｜ (U+FF5C) and ▁ (U+2581).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_END = "<｜fim▁end｜>"
THINK, END_THINK = "<think>", "</think>"
TOOL_TOKENS = [
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
    "<｜tool▁sep｜>",
]
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, FIM_HOLE, FIM_BEGIN, FIM_END, *TOOL_TOKENS]
# <think> and </think> are ordinary added tokens in V3.1: they survive skip_special_tokens.
PLAIN_ADDED = [THINK, END_THINK]

# V3-style template: system prompts joined at the front, <｜User｜>q<｜Assistant｜>a<｜end▁of▁sentence｜>,
# tool calls as V3 writes them (type, name, ```json args```), tool outputs in one outputs block that the
# next assistant text follows directly. Unlike V3's own template it also closes a single tool call.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='', in_tool=false, first_output=true) -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ('\n\n' if ns.system else '') + m['content'] -%}"
    "{%- endfor -%}"
    "{{ bos_token }}{{ ns.system }}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if ns.in_tool %}<｜tool▁outputs▁end｜>{% set ns.in_tool = false %}{% endif -%}"
    "<｜User｜>{{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- if ns.in_tool %}<｜tool▁outputs▁end｜>{% set ns.in_tool = false %}{% else %}<｜Assistant｜>{% endif -%}"
    "{%- if m['content'] %}{{ m['content'] }}{% endif -%}"
    "{%- if m.get('tool_calls') -%}<｜tool▁calls▁begin｜>"
    "{%- for t in m['tool_calls'] -%}"
    "{%- set args = t['function']['arguments'] -%}"
    "{{ '\n' if not loop.first else '' }}<｜tool▁call▁begin｜>{{ t.get('type', 'function') }}<｜tool▁sep｜>"
    "{{ t['function']['name'] }}\n```json\n{{ args if args is string else args | tojson }}\n```<｜tool▁call▁end｜>"
    "{%- endfor -%}<｜tool▁calls▁end｜>"
    "{%- endif -%}"
    "<｜end▁of▁sentence｜>{% set ns.first_output = true %}"
    "{%- elif m['role'] == 'tool' -%}"
    "{%- if ns.first_output %}<｜tool▁outputs▁begin｜>{% else %}{{ '\n' }}{% endif -%}"
    "<｜tool▁output▁begin｜>{{ m['content'] }}<｜tool▁output▁end｜>"
    "{%- set ns.in_tool = true %}{% set ns.first_output = false -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.in_tool %}<｜tool▁outputs▁end｜>{% elif add_generation_prompt %}<｜Assistant｜>{% endif -%}"
)


def new_bpe() -> tokenizers.Tokenizer:
    """An untrained byte-level BPE with DeepSeek-Coder's pre-tokenizer."""
    tok = tokenizers.Tokenizer(models.BPE())
    split = [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+"]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in split]
        + [pre_tokenizers.Digits(individual_digits=True),
           pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    tok = new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED])
    # BOS first, as DeepSeek-Coder's tokenizer adds it (transformers reads this post-processor; selfseek
    # reads add_bos_token below).
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def tokenizer_config(model_max_length: int) -> dict:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


def save_tokenizer(tok: tokenizers.Tokenizer, out: str | Path, model_max_length: int = 4096) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = tokenizer_config(model_max_length)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def build_tokenizer_folder(texts: Iterable[str], vocab_size: int, out: str | Path, model_max_length: int = 4096):
    """Train on `texts` and write tokenizer.json + tokenizer_config.json (with the chat template) to `out`."""
    return save_tokenizer(train_tokenizer(texts, vocab_size), out, model_max_length)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json")
