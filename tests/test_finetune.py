"""Fine-tuning (issue 15 A): LoRA / QLoRA on every family (routed experts included), the peft adapter format checked
against peft on transformers, merged safetensors and GGUF exports, chat SFT with assistant-only loss and packing, and
the errors bad inputs get. Tiny random checkpoints written by transformers (tests/checkpoints.py)."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from selfseek.train.config import TrainConfigError, load_config
from selfseek.train.data import IGNORE, ChatExamples, collate, encode_chat, read_chat_jsonl
from selfseek.train.export import dequantize_model, export_gguf, export_hf, read_config, tokenizer_metadata_of
from selfseek.train.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRAExperts,
    LoRALinear,
    apply_lora,
    load_adapter,
    merge_lora,
    save_adapter,
)
from selfseek.train.losses import lm_losses
from selfseek.weights import load_model

sys.path.insert(0, str(Path(__file__).parent))
from checkpoints import add_tokenizer, greedy_tokens, save_hf_checkpoint  # noqa: E402

# ChatML-like: the assistant turn is marked by the generation prompt; prefixes render as prefixes of the whole.
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NO_MARKER = "{% for m in messages %}{{ m.content }}\n{% endfor %}"
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")


_BASES: dict[str, Path] = {}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """family -> a tiny random checkpoint folder with a BPE tokenizer and a ChatML template (made once)."""

    def make(family: str) -> Path:
        if family not in _BASES:
            d = tmp_path_factory.mktemp(family)
            save_hf_checkpoint(family, d)
            add_tokenizer(d)
            tc = json.loads((d / "tokenizer_config.json").read_text())
            (d / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": CHATML}))
            _BASES[family] = d
        return _BASES[family]

    return make


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero B matrices (a fresh adapter is exactly the base), so a wrong name or layout cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.05, generator=g)
            elif isinstance(m, LoRAExperts):
                for b in m.lora_B.values():
                    b.normal_(0, 0.05, generator=g)


def _adapted(folder: Path, family: str, quantize: int = 0, experts: bool | None = None):
    """LoRA on attention and, on MoE models, the routed experts (peft on transformers 5 maps gate/up/down targets
    to the fused expert parameters only, so dense MLPs and shared experts are left out there); else the MLPs too."""
    model, tok = load_model(folder, "float32", progress=False, quantize=quantize)
    is_moe = family.startswith("v")
    apply_lora(model, 4, 8.0, ATTN if is_moe else ATTN + MLP, experts=is_moe if experts is None else experts)
    _randomize(model)
    return model.eval(), tok


IDS = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(5))


# ---- LoRA on every family, peft's format ---------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "llama3", "qwen3", "v3_noaux", "v2_lite_greedy"])
def test_adapter_loads_in_peft_with_equal_logits(base, family, tmp_path):
    import peft
    import transformers

    folder = base(family)
    # peft 0.21 loads V3's per-expert adapters into transformers' fused experts, not V2's (it leaves them missing)
    model, _ = _adapted(folder, family, experts=family.startswith("v3"))
    save_adapter(model, tmp_path / "adapter", base=str(folder))
    cfg = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ours, plain = model(IDS), hf(IDS).logits
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(IDS).logits
    assert (ours - plain).abs().max() > 0.05  # the adapter (experts included) changes the output
    assert (ours - theirs).abs().max().item() <= 1e-4
    if family.startswith("v3"):  # the routed experts carry adapters, and they matter
        experts = [m for m in model.modules() if isinstance(m, LoRAExperts)]
        assert experts
        with torch.no_grad():
            for m in experts:
                for b in m.lora_B.values():
                    b.zero_()
            assert (model(IDS) - ours).abs().max() > 1e-3
    # reloaded into a fresh selfseek model, and merged: the same function
    fresh, _ = load_model(folder, "float32", progress=False)
    with torch.no_grad():
        reloaded = load_adapter(fresh, tmp_path / "adapter")(IDS)
        merged = merge_lora(fresh)(IDS)
    assert (reloaded - theirs).abs().max().item() <= 1e-4
    assert (merged - reloaded).abs().max().item() <= 1e-4
    assert not any(isinstance(m, LoRALinear | LoRAExperts) for m in fresh.modules())


def test_router_trains_when_asked_and_its_weights_travel_with_the_adapter(base, tmp_path):
    import peft
    import transformers

    folder = base("v3_noaux")
    model, _ = load_model(folder, "float32", progress=False)
    apply_lora(model, 2, 4.0, ["q_b_proj"], experts=True, train_router=True)
    gates = [p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
    assert gates and all(p.requires_grad for p in gates)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "e_score_correction_bias" in n)
    with torch.no_grad():
        gates[0].add_(0.3)
    save_adapter(model, tmp_path / "a", base=str(folder))
    assert json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())["modules_to_save"] == ["gate"]
    fresh, _ = load_model(folder, "float32", progress=False)
    load_adapter(fresh, tmp_path / "a")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ours, plain = model(IDS), hf(IDS).logits
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "a").eval()(IDS).logits
        assert (ours - plain).abs().max() > 0.05
        assert (fresh(IDS) - ours).abs().max().item() <= 1e-5
        assert (theirs - ours).abs().max().item() <= 1e-4  # peft: the router as modules_to_save
    frozen, _ = load_model(folder, "float32", progress=False)
    apply_lora(frozen, 2, 4.0, ["q_b_proj"], experts=True)
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if n.endswith("mlp.gate.weight"))


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_equals_lora_on_the_dequantized_base(base, bits):
    """The base stays packed (QuantLinear / QuantStack); forward and adapter gradients equal LoRA over the same
    weights in float, so the gradient really flows back through the frozen quantized layers."""
    folder = base("v3_noaux")
    q, _ = _adapted(folder, "v3_noaux", quantize=bits)
    assert any(type(m).__name__ == "QuantStack" for m in q.modules())
    f = dequantize_model(copy.deepcopy(q))
    assert not any(type(m).__name__ in ("QuantStack", "QuantLinear") for m in f.modules())
    outs = []
    for m in (q, f):
        m.train()
        loss = m(IDS).logsumexp(-1).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
        outs.append((loss.item(), grads))
    (lq, gq), (lf, gf) = outs
    assert gq.keys() == gf.keys() and any(".experts.lora_A." in n for n in gq)
    assert any("layers.0." in n for n in gq)  # the first layer's adapters get gradient through every layer above
    assert abs(lq - lf) <= 1e-4
    for n in gq:
        assert (gq[n] - gf[n]).abs().max().item() <= 1e-4 * max(1.0, gf[n].abs().max().item()), n


# ---- merged exports -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "v3_noaux"])
def test_merged_safetensors_and_gguf(base, family, tmp_path):
    """`selfseek train merge`: transformers loads the merged folder with the adapted model's logits; selfseek loads
    the merged GGUF (f16) and decodes the same greedy tokens."""
    import transformers

    from selfseek.train.cli import main

    folder = base(family)
    model, _ = _adapted(folder, family)
    save_adapter(model, tmp_path / "adapter", base=str(folder))
    with torch.no_grad():
        ours = model(IDS)
    prompt = IDS[0, :8].tolist()
    want = greedy_tokens(model, prompt, 8)
    assert main(["merge", "--base", str(folder), "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "merged"), "--gguf", "f16"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(IDS).logits - ours).abs().max().item() <= 1e-4
    g, tok = load_model(tmp_path / "merged" / "merged.f16.gguf", "float32", progress=False)
    assert tok is not None and greedy_tokens(g, prompt, 8) == want
    merged = merge_lora(copy.deepcopy(model))
    with pytest.raises(ValueError, match="outtype 'q3_k'; choose one of"):
        export_gguf(merged, tmp_path / "m.q3_k.gguf", "q3_k", tokenizer_metadata_of(folder, family))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]


# ---- chat data and packing --------------------------------------------------------------------------


def _tok(folder: Path, template: str = CHATML):
    from selfseek.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(folder)
    tok.chat_template = template
    tok._templates = {"default": template}
    return tok


def _chat_file(path: Path, n: int, seed: int) -> Path:
    import random

    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            msgs = [{"role": "user", "content": f"{a} plus {b}?"},
                    {"role": "assistant", "content": f"The answer is {a + b}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def test_assistant_only_labels_and_think_kept_or_dropped(base):
    tok = _tok(base("qwen2"))
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "reasoning_content": "greet back"},
            {"role": "user", "content": "bye"}, {"role": "assistant", "content": "<think>\nok\n</think>\n\nsee you"}]
    for think, want in (("keep", "<think>\ngreet back\n</think>\n\nhello<|im_end|>\n<think>\nok\n</think>\n\nsee you"
                                 "<|im_end|>\n"),
                        ("drop", "hello<|im_end|>\nsee you<|im_end|>\n")):
        ids, labels = encode_chat(msgs, tok, think=think)
        assert tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE]) == want
        assert "<|im_start|>user\nhi" in tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE])
    # R1's template strips reasoning from assistant turns: keeping it there is an error, dropping it is fine
    r1_like = _tok(base("qwen2"), CHATML.replace("{{ m.content }}", "{{ m.content.split('</think>')[-1] }}"))
    with pytest.raises(TrainConfigError, match="drops the assistant's <think> reasoning; set data.think=drop"):
        encode_chat(msgs, r1_like, think="keep")
    assert encode_chat(msgs, r1_like, think="drop")[0]


@pytest.mark.parametrize("family", ["qwen2", "v3_noaux"])
def test_packed_rows_equal_separate_conversations(base, family, tmp_path):
    """No cross-document attention: a packed row's loss and gradients equal those of its conversations run apart."""
    folder = base(family)
    model, tok = _adapted(folder, family)
    model.train()
    convs = read_chat_jsonl([str(_chat_file(tmp_path / "c.jsonl", 3, 0))])
    items = ChatExamples(convs, tok, 256, pack=True).items
    inputs, targets, lens = collate(items, 0, pack=True)
    assert inputs.shape == (1, sum(lens)) and len(lens) == 3
    packed = lm_losses(model, inputs, targets, mtp=False, doc_lens=lens).lm
    packed.backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    apart = sum(lm_losses(model, x[None], y[None], mtp=False).lm for x, y in items)
    apart.backward()
    assert abs(packed.item() - apart.item()) <= 1e-4 * apart.item()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert (p.grad - g_packed[n]).abs().max().item() <= 1e-5, n
    # and attending across the boundary would change it: one document of the concatenation differs
    whole = lm_losses(model, inputs, targets, mtp=False).lm
    assert abs(whole.item() - apart.item()) > 1e-3


# ---- SFT end to end -------------------------------------------------------------------------------------


def _sft(folder: Path, out: Path, train: Path, valid: Path, *overrides: str):
    from selfseek.train.sft import setup_sft

    cfg = load_config("sft", None, [
        f"base={folder}", f"out_dir={out}", f"data.train={train}", f"data.valid={valid}", "threads=1",
        "train.progress=false", "train.log_every=1", "train.eval_every=0", "train.batch_size=8",
        "train.micro_batch_size=8", "optim.lr=1e-2", "optim.warmup_steps=1", "lora.r=8", "lora.alpha=16",
        *overrides,
    ])
    trainer = setup_sft(cfg)
    before = trainer.evaluate()
    res = trainer.run()
    return before, trainer.evaluate(), res, trainer


@pytest.mark.parametrize("family,extra", [
    ("qwen2", ["data.pack=true", "train.steps=8"]),
    ("v3_noaux", ["lora.experts=true", "lora.quantize=4", "train.steps=6", "gguf=[f16]"]),
])
def test_lora_sft_lowers_held_out_loss(base, family, extra, tmp_path):
    folder = base(family)
    train, valid = _chat_file(tmp_path / "train.jsonl", 64, 0), _chat_file(tmp_path / "valid.jsonl", 16, 1)
    targets = "lora.targets=[" + ",".join(ATTN + ([] if family.startswith("v") else MLP)) + "]"
    before, after, res, trainer = _sft(folder, tmp_path / "run", train, valid, targets, *extra)
    losses = [r["loss"] for r in trainer.history]
    print(f"{family}: held-out {before:.3f} -> {after:.3f}; train loss by step {[round(x, 3) for x in losses]}")
    assert after < before - 0.5, (before, after)
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (tmp_path / "run" / "final" / "config.json").is_file()
    fresh, _ = load_model(folder, "float32", progress=False, quantize=4 if "lora.quantize=4" in extra else 0)
    load_adapter(fresh, adapter)
    merged, _ = load_model(tmp_path / "run" / "final", "float32", progress=False)
    with torch.no_grad():
        assert (merged(IDS) - fresh(IDS)).abs().max().item() <= 1e-4
    if "gguf=[f16]" in extra:
        g, _ = load_model(tmp_path / "run" / "final.f16.gguf", "float32", progress=False)
        assert greedy_tokens(g, IDS[0, :6].tolist(), 6) == greedy_tokens(fresh, IDS[0, :6].tolist(), 6)


# ---- bad inputs -----------------------------------------------------------------------------------------


def test_a_line_that_is_not_a_conversation_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    for bad in ('{"text": "plain"}', '{"messages": [{"content": "no role"}]}', '[1, 2]', '{"messages": "hi"}'):
        f.write_text(f"{good}\n\n{bad}\n")
        with pytest.raises(TrainConfigError, match=rf"{f}:3: not a conversation"):
            read_chat_jsonl([str(f)])


def test_a_template_without_assistant_marker_names_the_conversation(base, tmp_path):
    convs = read_chat_jsonl([str(_chat_file(tmp_path / "c.jsonl", 2, 0))])
    with pytest.raises(TrainConfigError, match=rf"{tmp_path / 'c.jsonl'}:1: the chat template has no assistant marker"):
        ChatExamples(convs, _tok(base("qwen2"), NO_MARKER), 256)


def test_an_adapter_for_another_base_is_refused_by_file_and_tensor(base, tmp_path):
    v3, _ = _adapted(base("v3_noaux"), "v3_noaux")
    save_adapter(v3, tmp_path / "v3_adapter")
    qwen, _ = load_model(base("qwen2"), "float32", progress=False)
    where = tmp_path / "v3_adapter" / "adapter_model.safetensors"
    with pytest.raises(TrainConfigError, match=rf"{where}: adapter tensors for 'model\.layers\.\d+\.self_attn\.\w+', "
                                               r"which this model has no .* another base model"):
        load_adapter(qwen, tmp_path / "v3_adapter")
    qwen3, _ = _adapted(base("qwen3"), "qwen3")
    save_adapter(qwen3, tmp_path / "qwen3_adapter")  # qwen2's module names, other shapes (head_dim 32)
    qwen, _ = load_model(base("qwen2"), "float32", progress=False)
    where = tmp_path / "qwen3_adapter" / "adapter_model.safetensors"
    with pytest.raises(TrainConfigError, match=rf"{where}: tensor '.*' has shape .* another base model"):
        load_adapter(qwen, tmp_path / "qwen3_adapter")


def test_an_adapter_folder_it_cannot_load_names_file_and_field(base, tmp_path):
    """The reader shared with serving (models/lora_serving.read_peft_folder) plus training's own limits."""
    model, _ = _adapted(base("qwen2"), "qwen2")
    save_adapter(model, tmp_path / "a")
    cfg_file, weights = tmp_path / "a" / ADAPTER_CONFIG, tmp_path / "a" / ADAPTER_WEIGHTS
    cfg = json.loads(cfg_file.read_text())
    fresh, _ = load_model(base("qwen2"), "float32", progress=False)
    for field, value in [("use_dora", True), ("fan_in_fan_out", True), ("bias", "all"), ("lora_alpha", "8"),
                         ("use_rslora", True), ("alpha_pattern", {"q_proj": 2}), ("r", 0)]:
        cfg_file.write_text(json.dumps({**cfg, field: value}))
        with pytest.raises(TrainConfigError, match=rf"^{re.escape(str(cfg_file))}: field '{field}'"):
            load_adapter(fresh, tmp_path / "a")
    cfg_file.write_text(json.dumps(cfg))
    weights.write_bytes(b"not safetensors")
    with pytest.raises(TrainConfigError, match=rf"^{re.escape(str(weights))}: cannot read it as safetensors"):
        load_adapter(fresh, tmp_path / "a")
    weights.unlink()
    with pytest.raises(TrainConfigError, match=r"no adapter_model\.safetensors"):
        load_adapter(fresh, tmp_path / "a")
    assert not any(isinstance(m, LoRALinear) for m in fresh.modules())  # refused before wrapping anything


def test_nothing_is_written_half_way(base, tmp_path, monkeypatch):
    import selfseek.train.export as export
    import selfseek.train.lora as lora

    model, _ = _adapted(base("qwen2"), "qwen2")
    save_adapter(model, tmp_path / "adapter")
    before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(lora, "save_file", boom)
    monkeypatch.setattr(export, "save_file", boom)
    _randomize(model, seed=7)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "adapter")
    with pytest.raises(OSError, match="disk full"):
        export_hf(merge_lora(model), read_config(base("qwen2")), tmp_path / "merged")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before  # the old one intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folders, no partial export
