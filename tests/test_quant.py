"""Weight-only int8 / int4 quantization: kernels, quantized models, `selfseek quantize` round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from checkpoints import VOCAB, build_hf_model
from test_kernels import ref_dequantize

from selfseek import kernels
from selfseek.models.quant import QuantLinear, quantize_weight
from selfseek.weights.safetensors import load_checkpoint


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_weight_rounds_to_the_nearest_step(bits):
    torch.manual_seed(0)
    w = torch.randn(96, 256) * 0.05
    q, d, m = quantize_weight(w, bits)
    ref = ref_dequantize(q, d, m)  # the format's definition (tests/test_kernels.py)
    assert (ref - w).abs().max() <= d.float().max() * 0.51 + 1e-4  # within half a step (+ fp16 scale rounding)
    layer = QuantLinear(256, 96, bits)
    layer.set_from_float(w)
    torch.testing.assert_close(layer.weight, ref, rtol=1e-6, atol=1e-7)
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer(x), x @ ref.T, rtol=1e-4, atol=1e-5)  # up to fp32 summation order


def test_kernels_are_built_here():
    if os.environ.get("SELFSEEK_NO_KERNELS"):
        pytest.skip("native kernels switched off")
    assert kernels.available(), "the kernels should compile on this machine (g++)"


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("v3")
    build_hf_model("v3_noaux").save_pretrained(folder)
    return folder


def _kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    p, q = ref.float().log_softmax(-1), got.float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


# Random tiny weights put many experts and tokens near ties, so rounding moves the KL more than on a trained
# model; a layout bug (nibble order, scale indexing) gives KL of order 1 and fails by a wide margin.
@pytest.mark.parametrize("bits, max_kl", [(8, 0.01), (4, 0.1)])
def test_quantized_model_stays_close_to_float(v3, bits, max_kl):
    ids = torch.randint(2, VOCAB, (1, 48), generator=torch.Generator().manual_seed(1))
    ref = load_checkpoint(v3, progress=False)
    q = load_checkpoint(v3, progress=False, quantize=bits)
    assert isinstance(q.model.layers[0].self_attn.q_a_proj, QuantLinear)
    assert q.model.layers[1].mlp.experts.gate_proj.qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    with torch.no_grad():
        kl = _kl(ref(ids), q(ids))
    assert kl < max_kl
    # memory: quantized layers hold ~1 (int8) or ~0.5 (int4) bytes per weight plus 4-8 bytes per 32
    qbytes = sum(b.nbytes for n, b in q.named_buffers() if n.endswith(("qweight", "scales", "mins")))
    n_weights = sum(m.in_features * m.out_features for m in q.modules() if isinstance(m, QuantLinear))
    n_weights += sum(s.n * s.in_features * s.out_features for s in q.modules() if hasattr(s, "n"))
    assert qbytes / n_weights <= (1 + 2 / 32 + 1e-9 if bits == 8 else 0.5 + 4 / 32 + 1e-9)  # as GGUF Q8_0 / Q4_1


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_command_writes_a_checkpoint_that_loads_back(v3, tmp_path, bits):
    out = tmp_path / f"q{bits}"
    proc = subprocess.run([sys.executable, "-m", "selfseek.cli", "quantize", "--model", str(v3), "--bits", str(bits),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "selfseek", "bits": bits, "group_size": 32}
    def size(folder):
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))

    assert size(out) < size(v3) / 2
    ids = torch.randint(2, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    direct = load_checkpoint(v3, progress=False, quantize=bits)
    loaded = load_checkpoint(out, progress=False)
    with torch.no_grad():
        assert torch.equal(direct(ids), loaded(ids))


def test_tied_embedding_is_one_quantized_matrix(tmp_path):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    hf.save_pretrained(tmp_path)
    q = load_checkpoint(tmp_path, progress=False, quantize=8)
    assert q.lm_head is q.model.embed_tokens
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert _kl(hf(ids).logits, q(ids)) < 1e-3


@pytest.mark.parametrize("family", ["v3_noaux", "qwen2"])  # qwen2: linear biases
def test_auto_dtype_on_cpu_keeps_16bit_storage_and_computes_in_fp32(tmp_path, family):
    """A bf16 checkpoint under dtype="auto" on a CPU: weights stay bf16 (half the memory), the model computes in
    fp32, and its logits are those of the same bf16 weights widened to fp32, up to summation order."""
    from selfseek.models.quant import HalfEmbedding, HalfLinear, describe_dtypes

    build_hf_model(family).to(torch.bfloat16).save_pretrained(tmp_path)
    auto = load_checkpoint(tmp_path, dtype="auto", progress=False)
    fp32 = load_checkpoint(tmp_path, dtype="float32", progress=False)
    assert auto.dtype == torch.float32
    assert isinstance(auto.lm_head, HalfLinear) and auto.lm_head.weight.dtype == torch.bfloat16
    assert isinstance(auto.model.embed_tokens, HalfEmbedding)
    float_bytes = {m: sum(p.nbytes for p in m.parameters()) for m in (auto, fp32)}
    assert float_bytes[auto] < 0.55 * float_bytes[fp32]
    if family == "v3_noaux":
        assert auto.model.layers[1].mlp.experts.gate_proj.dtype == torch.bfloat16
        assert auto.model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.float32  # folded into fp32 queries
    assert "bfloat16" in describe_dtypes(auto) and describe_dtypes(auto).endswith("compute in float32")
    ids = torch.randint(2, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = auto(ids), fp32(ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # an explicit dtype is what it says: bf16 compute keeps plain layers
    bf16 = load_checkpoint(tmp_path, dtype="bfloat16", progress=False)
    assert bf16.dtype == torch.bfloat16 and type(bf16.lm_head) is torch.nn.Linear
