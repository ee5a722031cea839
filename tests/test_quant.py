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


# ---------------------------------------------------------------- DeepSeek FP8 / FP4 weights kept packed


def _fp8_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize [..., out, in] to e4m3 with one scale per block (DeepSeek's layout, amax / 448)."""
    rows, cols = w.shape[-2:]
    nr, nc = -(-rows // block[0]), -(-cols // block[1])
    pad = torch.nn.functional.pad(w, (0, nc * block[1] - cols, 0, nr * block[0] - rows))
    blocks = pad.unflatten(-1, (nc, block[1])).unflatten(-3, (nr, block[0]))  # [..., nr, b0, nc, b1]
    s = blocks.abs().amax((-3, -1)).clamp_min(1e-12) / 448
    q = (blocks / s[..., :, None, :, None]).flatten(-4, -3).flatten(-2)[..., :rows, :cols]
    return q.to(torch.float8_e4m3fn), s.float()


def test_fp8_checkpoint_stays_fp8_and_matches_its_dequantized_weights(v3, tmp_path):
    """An FP8 V3 checkpoint (e4m3 + weight_scale_inv, [16, 128] blocks so layers hold several) loads with its FP8
    layers kept as FP8 bytes, and its logits equal those of the same weights dequantized (plain torch) and saved
    as float32. q_b_proj (48 inputs, not whole 32-blocks) takes the dequantizing path."""
    from safetensors.torch import load_file, save_file
    from test_kernels import ref_fp8

    from selfseek.models.quant import QuantStack

    block = (16, 128)
    state = load_file(v3 / "model.safetensors")
    fp8, ref = {}, {}
    for name, t in state.items():
        if name.endswith("proj.weight"):
            q, s = _fp8_blocks(t, block)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            pairs = zip(q.reshape(-1, *q.shape[-2:]), s.reshape(-1, *s.shape[-2:]), strict=True)
            ref[name] = torch.stack([ref_fp8(a, b, block) for a, b in pairs]).reshape(t.shape)
        else:
            fp8[name] = ref[name] = t
    config = json.loads((v3 / "config.json").read_text())
    for folder, tensors, qc in ((tmp_path / "fp8", fp8, True), (tmp_path / "ref", ref, False)):
        folder.mkdir()
        save_file(tensors, folder / "model.safetensors")
        cfg = {**config, "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                                  "weight_block_size": list(block)}} if qc else config
        (folder / "config.json").write_text(json.dumps(cfg))
    packed = load_checkpoint(tmp_path / "fp8", progress=False)
    attn, mlp = packed.model.layers[1].self_attn, packed.model.layers[1].mlp
    assert isinstance(attn.q_a_proj, QuantLinear) and attn.q_a_proj.bits == "fp8"
    assert attn.q_a_proj.qweight.dtype == torch.uint8 and attn.q_a_proj.qweight.shape == (48, 64)
    assert all(isinstance(s, QuantStack) and s.bits == "fp8" for s in mlp.experts.children())  # per-expert tensors
    assert type(attn.q_b_proj) is torch.nn.Linear
    want = load_checkpoint(tmp_path / "ref", progress=False)
    torch.testing.assert_close(attn.q_a_proj.weight, want.model.layers[1].self_attn.q_a_proj.weight, rtol=0, atol=0)
    ids = torch.randint(2, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, exp = packed(ids), want(ids)
    assert ((got - exp).abs().max() / exp.abs().max()).item() < 1e-5  # fp32 summation order


def test_fp8_and_fp4_constructors_take_the_checkpoint_tensors():
    """pack_fp8 / pack_fp4 from the tensors as DeepSeek's checkpoints store them (fp32 or ue8m0 scale_inv for FP8;
    int8 / float4_e2m1fn_x2 pairs and float8_e8m0fnu scales for V4's FP4 experts), against plain-torch dequantize."""
    from test_kernels import ref_fp4, ref_fp8

    from selfseek.models.quant import QuantStack, pack_fp4, pack_fp8

    g = torch.Generator().manual_seed(0)
    w8, s8 = _fp8_blocks(torch.randn(200, 256, generator=g), (128, 128))
    ue8m0 = torch.exp2(torch.ceil(torch.log2(s8))).to(torch.float8_e8m0fnu)  # V3.1 / V4 power-of-two scales
    x = torch.randn(3, 256, generator=g)
    for scale in (s8, ue8m0):
        layer = QuantLinear.from_packed(pack_fp8(w8, scale))
        ref = ref_fp8(w8, scale.float(), (128, 128))
        assert torch.equal(layer.weight, ref)
        torch.testing.assert_close(layer(x), x @ ref.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"weight_scale_inv has shape \[1, 2\].*needs \[2, 2\]"):
        pack_fp8(w8, s8[:1])
    experts = [torch.randint(-128, 128, (64, 128), dtype=torch.int8, generator=g) for _ in range(3)]
    scales = [torch.randint(120, 130, (64, 8), dtype=torch.uint8, generator=g).view(torch.float8_e8m0fnu)
              for _ in range(3)]
    fp4_x2 = getattr(torch, "float4_e2m1fn_x2", None)
    if fp4_x2 is not None:  # the dtype newer checkpoints declare: the same bytes
        experts[1] = experts[1].view(fp4_x2)
    stack = QuantStack.from_fp4(experts, scales)
    assert stack.qweight.shape == (3, 64, 128) and stack.scales.dtype == torch.uint8
    for e in range(3):
        ref = ref_fp4(experts[e].view(torch.int8), scales[e])
        assert torch.equal(kernels.to_float(stack.packed[e]), ref)
        torch.testing.assert_close(stack.linear(e, x), x @ ref.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"fp4 scale has shape \[64, 4\].*needs \[64, 8\]"):
        pack_fp4(experts[0], scales[0][:, :4])
    with pytest.raises(ValueError, match="powers of two"):
        pack_fp4(experts[0], torch.full((64, 8), 0.3))


@pytest.mark.parametrize("fmt", ["q4_k", "fp8"])
def test_packed_layers_fuse_by_rows(fmt):
    """layers.fused_rows (q/k/v, q_a + kv_a) concatenates packed layers' bytes and per-row scales: the fused layer
    gives each part's output."""
    from test_kernels import make_packed

    from selfseek.models.layers import fused_rows

    parts = tuple(QuantLinear.from_packed(make_packed(fmt, rows, 512, seed=rows)[0]) for rows in (48, 136))
    x = torch.randn(2, 512)
    want = torch.cat([p(x) for p in parts], dim=-1)
    with torch.no_grad():
        fused = fused_rows(torch.nn.Module(), parts)
        assert isinstance(fused, QuantLinear) and fused.bits == fmt
        torch.testing.assert_close(fused(x), want, rtol=0, atol=0)


def test_interleaving_a_q8_stack_keeps_its_weights():
    from selfseek.models.quant import QuantStack, interleave

    g = torch.Generator().manual_seed(3)
    stack = QuantStack(3, 64, 48, 8)
    for e in range(3):
        stack.set_from_float(e, torch.randn(48, 64, generator=g))
    before = [kernels.to_float(stack.expert(e)) for e in range(3)]
    assert interleave(stack) and stack.bits == "q8_0x16" and not interleave(stack)
    assert stack.qweight.shape == (3, 48, 2 * 34) and stack.scales.shape == (3, 48, 0)
    assert all(torch.equal(kernels.to_float(stack.expert(e)), before[e]) for e in range(3))
    x = torch.randn(2, 64, generator=g)
    assert torch.allclose(stack.linear(1, x), x @ before[1].T, atol=1e-5)
    with pytest.raises(TypeError, match="q8_0x16 stack holds its file's encoding"):
        stack.set_from_float(0, torch.randn(48, 64))
    assert not interleave(QuantStack(2, 64, 40, 8))  # 40 rows: not whole groups of 16
    assert not interleave(QuantStack(2, 64, 48, 4))  # q4: offsets, and not the int8 kernels' q8 layout
    layer = QuantLinear(64, 32, 8)
    layer.set_from_float(torch.randn(32, 64, generator=g))
    want = layer(x)
    assert interleave(layer) and layer.bits == "q8_0x16" and layer.qweight.shape == (32, 68) and layer.mins is None
    assert torch.allclose(layer(x), want, atol=1e-5)
