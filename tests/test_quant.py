"""Weight-only int8 / int4 quantization: kernels, quantized models, `selfseek quantize` round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from checkpoints import VOCAB, build_hf_model

from selfseek import kernels
from selfseek.models.quant import QuantLinear, quantize_weight
from selfseek.weights.safetensors import load_checkpoint


def _fallback_dequantize(q, d, m, q4):
    """The plain-torch path, with the native kernels switched off."""
    saved = kernels._ext, kernels._tried
    kernels._ext, kernels._tried = None, True
    try:
        return kernels.dequantize(q, d, m, q4)
    finally:
        kernels._ext, kernels._tried = saved


@pytest.mark.parametrize("bits", [8, 4])
def test_native_kernels_agree_with_the_torch_definition(bits):
    torch.manual_seed(0)
    w = torch.randn(96, 256) * 0.05
    q, d, m = quantize_weight(w, bits)
    ref = _fallback_dequantize(q, d, m, bits == 4)
    assert (ref - w).abs().max() <= d.float().max() * 0.51 + 1e-4  # within half a step (+ fp16 scale rounding)
    # equal up to the last bit: the native d * q + m may be one fused multiply-add, torch rounds twice
    assert torch.allclose(kernels.dequantize(q, d, m, bits == 4), ref, rtol=1e-6, atol=1e-7)
    for rows in (1, 3, kernels.GEMM_MIN_ROWS + 4):
        x = torch.randn(rows, 256)
        y = kernels.quant_linear(x, q, d, m, bits == 4)
        exact = x @ ref.T
        # float activations against the dequantized weight: equal up to fp32 summation order
        assert torch.allclose(y, exact, rtol=1e-4, atol=1e-5)


def test_kernels_are_built_here():
    if os.environ.get("SELFSEEK_NO_KERNELS"):
        pytest.skip("native kernels switched off")
    assert kernels.available(), "the AVX2 kernels should compile on this machine (gcc + torch headers)"


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
