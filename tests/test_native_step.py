"""The native decode step (models/native_step.py) against the module path it replaces: the same kernels in the same
order, so greedy tokens and logprobs are bit for bit equal; and it steps aside for whatever it cannot run so."""

from __future__ import annotations

import pytest
import torch
from checkpoints import VOCAB, tiny_model

from selfseek.engine.engine import EngineArgs, LLMEngine
from selfseek.models.model import CausalLM
from selfseek.models.native_step import NativeStack
from selfseek.models.quant import keep_16bit_storage, quantize_model
from selfseek.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not __import__("selfseek.kernels").kernels.available(),
                                reason="the native kernels are not built on this machine")


def tiny_llama(bits: int | str | None, family: str = "llama_linear", model_type: str = "llama", skip=("kv_b_proj",),
               **overrides) -> CausalLM:
    """bits: 8 / 4 packed, None float32, "bf16" bf16 storage with float32 compute (dtype auto on a CPU)."""
    model = tiny_model(family, model_type, **overrides)
    if bits == "bf16":
        keep_16bit_storage(model, torch.bfloat16)
    elif bits:
        quantize_model(model, bits, skip)
    return model


PROMPTS = [list(range(5, 8)), list(range(40, 57)), [(7 * i) % VOCAB for i in range(70)], [3, 4]]


def run(model: CausalLM, native: bool, monkeypatch, prompts=PROMPTS, **engine_kw) -> tuple[dict, int]:
    """Greedy tokens with their top-3 logprobs per request, and the number of steps the native path ran."""
    calls = [0]
    real_run = NativeStack.run

    def counted(self, *a):
        calls[0] += 1
        return real_run(self, *a)

    with monkeypatch.context() as m:
        m.setattr(NativeStack, "run", counted)
        if not native:
            m.setattr(NativeStack, "for_model", staticmethod(lambda model: None))
        engine = LLMEngine(model, None, EngineArgs(kv_cache_memory=1 << 22, block_size=4, max_num_batched_tokens=32,
                                                   **engine_kw))
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
        out: dict[str, list] = {}
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
            out[f"r{i}"] = []
        while engine.has_work():
            for d in engine.step():
                out[d.request_id] += list(zip(d.token_ids, d.logprobs or [], strict=True))
    return out, calls[0]


@pytest.mark.parametrize("bits,cache", [(4, "auto"), (8, "auto"), (4, "float16"), (8, "bfloat16"), (None, "auto"),
                                        ("bf16", "auto")])
def test_native_step_equals_the_module_path(bits, cache, one_thread, monkeypatch):
    """Decode batches of 1 to 4 sequences with different contexts over shuffled 4-slot blocks, chunked prefill
    (32-token budget) mixed in: tokens and logprobs identical, and the native path really ran (with an fp32 cache,
    and with a 16-bit one the new rows are rounded into). Packed weights, float32 ones (None) and 16-bit storage."""
    model = tiny_llama(bits)
    assert NativeStack.for_model(model).native is not None  # fp32 caches: the layers as one native call
    want, _ = run(model, False, monkeypatch, kv_cache_dtype=cache)
    got, calls = run(model, True, monkeypatch, kv_cache_dtype=cache)
    assert calls >= 9  # every pure decode step (10 tokens each, the first from the prefill)
    assert got == want


@pytest.mark.parametrize("bits,skip,cache", [(8, ("kv_b_proj",), "auto"), (4, (), "auto"), (8, (), "float16"),
                                             (None, (), "auto"), ("bf16", (), "auto")])
def test_native_step_equals_the_module_path_on_mla_and_moe(bits, skip, cache, one_thread, monkeypatch):
    """DeepSeek-V3 layers: MLA's absorbed decode (W^UK / W^UV read per head from kv_b_proj, float or packed as in a
    GGUF), the dense first layer, routed experts through the fused kernel plus the shared expert; packed weights,
    all float32 (bits None: float32 expert stacks in the fused kernel too) and all in bf16 storage."""
    model = tiny_llama(bits, "v3_noaux", "deepseek_v3", skip, q_lora_rank=64)  # 64: a whole number of 32-blocks
    assert NativeStack.for_model(model).native is not None  # fp32 caches: two native calls per layer and the router
    want, _ = run(model, False, monkeypatch, kv_cache_dtype=cache)
    got, calls = run(model, True, monkeypatch, kv_cache_dtype=cache)
    assert calls >= 9 and got == want


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0"])
def test_gguf_split_kv_b_halves_are_read_as_the_file_packs_them(qtype, one_thread, monkeypatch, tmp_path):
    """A GGUF writes kv_b_proj as attn_k_b / attn_v_b (llama.cpp's split): the absorbed decode reads W^UK and
    W^UV from those halves packed (Q8_0 directly, Q5_0 (llama.cpp's Q4_K_M k_b) as exact int8 blocks), on the native
    step and the module path alike (bit for bit), with the same greedy tokens as through kv_b_proj's float copy;
    once kv_b_proj changes, the halves are no longer used."""
    from gguf import GGMLQuantizationType

    from selfseek.weights import load_model
    from selfseek.weights.gguf_writer import write_gguf

    dims = dict(qk_nope_head_dim=32, v_head_dim=32, kv_lora_rank=64, q_lora_rank=64)  # whole 32-blocks
    write_gguf(tmp_path / "v3.gguf", tiny_llama(None, "v3_noaux", "deepseek_v3", **dims),
               GGMLQuantizationType[qtype])
    model, _ = load_model(tmp_path / "v3.gguf", progress=False)
    attns = [layer.self_attn for layer in model.model.layers]
    c = model.config.kv_lora_rank
    assert all(a.absorbed_products()[0][2:] == (c, 0, c, False) for a in attns)  # W^UK: k_b's c rows per head
    want, _ = run(model, False, monkeypatch)
    got, calls = run(model, True, monkeypatch)
    assert calls >= 9 and got == want
    for a in attns:  # the float copy instead
        del a.__dict__["_split_kv_b"]
    via_float, _ = run(model, False, monkeypatch)
    for rid, steps in want.items():
        assert [t for t, _ in steps] == [t for t, _ in via_float[rid]]
        for (_, a), (_, b) in zip(steps, via_float[rid], strict=True):
            assert all(abs(a[k] - b[k]) < 1e-4 for k in a)
    model, _ = load_model(tmp_path / "v3.gguf", progress=False)
    kv_b = model.model.layers[0].self_attn.kv_b_proj.weight
    with torch.no_grad():
        kv_b.mul_(2)  # a weight changed in place (fine-tuning): its halves from the file no longer hold
    assert model.model.layers[0].self_attn.absorbed_products()[0][5] is True  # kv_b_proj as stored, transposed
    assert model.model.layers[1].self_attn.absorbed_products()[0][5] is False


@pytest.mark.parametrize("family,model_type", [("llama_linear", "llama"), ("v3_noaux", "deepseek_v3")])
def test_packed_weights_are_never_widened_whole_while_serving(family, model_type, one_thread, monkeypatch):
    """Once warm, prefill and decode (module path and native step) read packed weights as they are: no call
    dequantizes a whole weight (QuantLinear.weight does; reading it for the output head made every decode step
    widen the whole head, 529 MB a step on the medium V3, until run_linear tested the class first)."""
    from selfseek import kernels

    model = tiny_llama(8) if model_type == "llama" else tiny_llama(8, family, model_type, (), q_lora_rank=64)
    run(model, True, monkeypatch)  # warm: what is made once (fused layers, MLA's per-head views) is made here
    monkeypatch.setattr(kernels, "to_float", lambda *a, **kw: pytest.fail("a whole weight was dequantized"))
    for native in (True, False):
        _, calls = run(model, native, monkeypatch)
        assert (calls > 0) == native


@pytest.mark.parametrize("family,model_type", [("llama_linear", "llama"), ("v3_noaux", "deepseek_v3")])
def test_native_step_with_int8_activations(family, model_type, one_thread, monkeypatch):
    """The opt-in int8-activation kernels are chosen the same way on both paths (the C layer loop included)."""
    from selfseek import kernels

    monkeypatch.setattr(kernels, "INT8_ACTIVATIONS", True)
    model = tiny_llama(4) if model_type == "llama" else tiny_llama(8, family, model_type, (), q_lora_rank=64)
    want, _ = run(model, False, monkeypatch)
    got, calls = run(model, True, monkeypatch)
    assert calls and got == want


@pytest.mark.parametrize("family,model_type", [("llama_linear", "llama"), ("v3_noaux", "deepseek_v3")])
def test_int8_serving_interleaves_q8_weights_and_keeps_the_answers(family, model_type, one_thread, monkeypatch):
    """With int8 activations on a level that reads it in vectors, the engine re-stores q8 layers and expert stacks
    as q8_0x16 (the same weights; the kernels' tests compare the products), the output head too, but not kv_b_proj
    (read per head) nor an embedding only looked up: greedy tokens as from the row-major weights, logprobs up to the
    int8 products' summation order, on the native step and the module path."""
    from selfseek import kernels
    from selfseek.models.quant import QuantLinear, QuantStack

    monkeypatch.setattr(kernels, "INT8_ACTIVATIONS", True)
    if not kernels.interleaves_q8():
        pytest.skip("this CPU's kernels read q8_0x16 in scalar code only: the engine keeps q8 weights as they are")
    model = (tiny_llama(8, tie_word_embeddings=True) if model_type == "llama"
             else tiny_llama(8, family, model_type, (), q_lora_rank=64))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantStack))}
    with monkeypatch.context() as m:
        m.setattr(kernels, "interleaves_q8", lambda: False)
        want, _ = run(model, True, monkeypatch)
    assert {m.bits for m in layers.values()} == {8}
    for native in (True, False):
        got, calls = run(model, native, monkeypatch)
        # kept: those, layers of rows not in whole groups of 16 and their siblings fused with them (same input)
        odd = {(n.rpartition(".")[0], m.in_features) for n, m in layers.items() if m.out_features % 16}
        kept = {n for n, m in layers.items() if m.bits == 8}
        assert kept == {n for n, m in layers.items() if n.endswith("kv_b_proj") or (n.rpartition(".")[0],
                        m.in_features) in odd or n == "model.embed_tokens" and m is not model.lm_head}
        assert (calls > 0) == native and not any(isinstance(layers[n], QuantStack) for n in kept)
        assert model.lm_head.bits == "q8_0x16"
        for r in want:
            assert [t for t, _ in got[r]] == [t for t, _ in want[r]]
            for (_, a), (_, b) in zip(got[r], want[r], strict=True):
                assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)


def test_native_step_takes_only_what_it_runs_exactly(one_thread, monkeypatch):
    # Qwen2's q/k/v biases and Qwen3's q/k norms are not in the native step: they keep the module path, packed or not
    assert NativeStack.for_model(tiny_llama(None, "qwen2", "qwen2")) is None
    assert NativeStack.for_model(tiny_llama(4, "qwen2", "qwen2")) is None
    assert NativeStack.for_model(tiny_llama(4, "qwen3", "qwen3")) is None
    assert NativeStack.for_model(tiny_llama(8, "v2_lite_greedy", "deepseek_v2")) is None  # no query compression
    model = tiny_llama(4)
    stack = NativeStack.for_model(model)
    assert stack is not None and NativeStack.for_model(model) is stack  # kept on the model
    # a forward hook (a profiler's timer) must run: the step goes through the modules while it is there
    seen = []
    handle = model.model.layers[1].mlp.register_forward_hook(lambda mod, a, o: seen.append(o.shape[0]))
    _, calls = run(model, True, monkeypatch, prompts=PROMPTS[:1])
    handle.remove()
    assert calls == 0 and len(seen) == 10
    # an fp8 cache is not one the native step writes
    _, calls = run(model, True, monkeypatch, prompts=PROMPTS[:1], kv_cache_dtype="fp8")
    assert calls == 0


def test_a_replaced_weight_makes_the_stack_again(one_thread, monkeypatch):
    model = tiny_llama(4)
    before, _ = run(model, True, monkeypatch)
    stack = NativeStack.for_model(model)
    down = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        down.set_from_float(torch.randn(down.out_features, down.in_features) * 0.1)
        down.qweight = down.qweight.clone()  # a new tensor: the old kernel view would read stale bytes
    assert NativeStack.for_model(model) is not stack
    want, _ = run(model, False, monkeypatch)
    got, calls = run(model, True, monkeypatch)
    assert calls and got == want and got != before


def test_hooks_are_seen_on_any_submodule():
    model = tiny_llama(4)
    stack = NativeStack.for_model(model)
    assert not stack.hooked()
    handle = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda mod, a: None)
    assert stack.hooked()
    handle.remove()
    assert not stack.hooked()
