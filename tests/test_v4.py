"""DeepSeek-V4: config (current and legacy names), logit parity with transformers' DeepseekV4ForCausalLM in fp32 in
prefill, chunked prefill and decode (every layer type, prompts longer than the window, indexer top-k 3 of many
compressed entries), released tensor names, the engine end to end (prefix cache, preemption, MTP drafts; window
rows held only for each sequence's last blocks, released rows poisoned) and the KV arithmetic."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from checkpoints import run_to_end
from safetensors.torch import load_file, save_file

from selfseek import LLM, SamplingParams, kernels
from selfseek.config import ConfigError, ModelConfig
from selfseek.engine.engine import EngineArgs, LLMEngine
from selfseek.models import deepseek_v4
from selfseek.models.batch import build_batch
from selfseek.models.quant import QuantLinear, QuantStack
from selfseek.weights.safetensors import CheckpointError, load_checkpoint

VOCAB, WINDOW, TOPK = 128, 8, 3
LAYER_TYPES = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
               "compressed_sparse_attention"]
# 16 indexer heads: an index score is exactly 0 (every head's ReLU off) with odds 2^-16, so top-k has no ties to
# break differently from transformers
TINY = dict(
    vocab_size=VOCAB, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
    head_dim=32, q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=4, layer_types=LAYER_TYPES,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8}, hc_mult=3,
    sliding_window=WINDOW, o_groups=2, o_lora_rank=8, index_n_heads=16, index_head_dim=16, index_topk=TOPK,
    mlp_layer_types=["hash_moe", "moe", "moe", "moe"], partial_rotary_factor=0.25, max_position_embeddings=1024,
    rope_parameters={"rope_type": "yarn", "factor": 16, "original_max_position_embeddings": 64}, swiglu_limit=1.0,
    bos_token_id=0, eos_token_id=1,
)


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _block_slots(lengths: list[int], seed: int, block: int = 16) -> tuple[list[torch.Tensor], int]:
    """Pool slots for sequences of `lengths` tokens in shuffled blocks of `block` slots, as the engine lays them
    (the V4 pool packs compressed entries per 16 aligned rows) -> (slots per sequence, pool slots)."""
    need = [-(-n // block) for n in lengths]
    order = torch.randperm(2 * sum(need), generator=torch.Generator().manual_seed(seed))
    out, at = [], 0
    for n, k in zip(lengths, need, strict=True):
        out.append((order[at : at + k, None] * block + torch.arange(block)).flatten()[:n])
        at += k
    return out, 2 * sum(need) * block


def _random_hf(**overrides):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(0)
    hf = DeepseekV4ForCausalLM(DeepseekV4Config(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # every parameter non-trivial (transformers zeroes sinks, biases and position biases)
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if p.dim() < 2 else p.shape[-1] ** -0.5))
        for name, b in hf.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.rand(b.shape[0], 4).argsort(-1)[:, : b.shape[1]])  # distinct experts per token
            elif name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return hf


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    hf = _random_hf()
    folder = tmp_path_factory.mktemp("v4")
    hf.save_pretrained(folder)
    return folder, hf, load_checkpoint(folder, dtype="float32", progress=False)


def _ref(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids[None], use_cache=False).logits[0]


# ---- config -------------------------------------------------------------------------------------------------


def test_config_reads_current_and_legacy_names(v4):
    from transformers import DeepseekV4Config

    folder, _, model = v4
    cfg = model.config
    assert cfg.v4.layer_types == tuple(LAYER_TYPES) and cfg.v4.mlp_layer_types[:2] == ("hash_moe", "moe")
    assert (cfg.v4.compress_rate_csa, cfg.v4.compress_rate_hca, cfg.qk_rope_head_dim) == (4, 8, 8)
    assert cfg.rope.type == "default" and cfg.v4.compress_rope.type == "yarn"
    assert cfg.v4.compress_rope.attention_factor == 1.0 and cfg.v4.compress_rope.theta == 160000.0
    # the released checkpoints' spelling: compress_ratios (MTP layer's last), num_hash_layers, rope_scaling + thetas
    current = ("layer_types", "compress_rates", "mlp_layer_types", "rope_parameters", "partial_rotary_factor")
    legacy = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k not in current}
    legacy.update(compress_ratios=[0, 4, 128, 4, 128], num_hash_layers=2, compress_rate_hca=16, qk_rope_head_dim=8,
                  rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 64,
                                "beta_fast": 32, "beta_slow": 1}, compress_rope_theta=40000.0)
    got = ModelConfig.from_dict(legacy)
    ref = DeepseekV4Config(**{k: v for k, v in legacy.items() if k not in ("architectures", "transformers_version")})
    assert list(got.v4.layer_types) == ref.layer_types and list(got.v4.mlp_layer_types) == ref.mlp_layer_types
    assert got.v4.compress_rate_hca == ref.compress_rates["heavily_compressed_attention"] == 16
    assert got.v4.mtp_layer_types == ("heavily_compressed_attention",)
    comp = ref.rope_parameters["compress"]
    assert (got.v4.compress_rope.theta, got.v4.compress_rope.factor, got.v4.compress_rope.attention_factor) == (
        comp["rope_theta"], comp["factor"], comp["attention_factor"])
    assert got.rope.type == "default" and got.qk_rope_head_dim == 8
    d = json.loads((folder / "config.json").read_text())
    for change, field in [({"layer_types": ["full_attention"] * 4}, "layer_types"),
                          ({"compress_ratios": [0, 3, 0, 0], "layer_types": None}, "compress_ratios"),
                          ({"mlp_layer_types": ["dense"] * 4}, "mlp_layer_types"), ({"o_groups": 3}, "o_groups"),
                          ({"scoring_func": "tanh"}, "scoring_func"),
                          ({"num_key_value_heads": 2}, "num_key_value_heads"),
                          ({"hc_foo": 1}, "hc_foo")]:
        with pytest.raises(ConfigError, match=field):
            ModelConfig.from_dict({**d, **change})


# ---- parity with transformers --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, WINDOW + 1, 70])
def test_prefill_logits_match_transformers_fp32(v4, n):
    _, hf, ours = v4
    ids = _ids(n, seed=n)
    with torch.no_grad():
        got = ours(ids[None])[0]
    assert (got - _ref(hf, ids)).abs().max().item() <= 1e-4


def test_rows_in_blocks_equal_one_block(v4, monkeypatch):
    """A score budget of a few rows (long prompts attend block by block) changes nothing."""
    _, hf, ours = v4
    ids = _ids(70, seed=70)
    monkeypatch.setattr(deepseek_v4.V4Attention, "SCORE_BUDGET", 300)
    with torch.no_grad():
        got = ours(ids[None])[0]
    assert (got - _ref(hf, ids)).abs().max().item() <= 1e-4


def test_every_branch_counts(v4):
    """Parity above would not catch a dropped branch if it changed nothing: the indexer's top-k, the compressed
    entries and the window each change the logits of a 70-token prompt."""
    _, _, ours = v4
    ids = _ids(70, seed=70)[None]
    attn = [layer.self_attn for layer in ours.model.layers]
    with torch.no_grad():
        base = ours(ids)
        for a in attn[1::2]:
            a.indexer.topk = 10**6
        dense = ours(ids)
        for a in attn[1::2]:
            a.indexer.topk = TOPK
        for a in attn:
            a.window = 10**6
        wide = ours(ids)
        for a in attn:
            a.window = WINDOW
    assert (dense - base).abs().max().item() > 1e-2 and (wide - base).abs().max().item() > 1e-2
    assert (dense - base)[:, : 4 * (TOPK + 1) - 1].abs().max().item() <= 1e-5  # rows seeing <= top-k entries


@pytest.mark.parametrize("path", ["fused", "torch"])
def test_experts_one_row_path_matches_the_formula(v4, kernel_env, path):
    """V4Experts, through the fused MoE kernel (swiglu_limit clamp inside it) or the torch paths (decode: one row,
    routing read as Python numbers; grouped), equals the plain formula, one row or several (up to the matmuls'
    summation order), with an expert picked twice by one row and the swiglu clamp reached."""
    if path == "torch":
        kernel_env(SELFSEEK_NO_KERNELS="1")
    _, _, ours = v4
    experts = next(m for m in ours.modules() if isinstance(m, deepseek_v4.V4Experts))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 32, generator=g) * 4
    w, ids = torch.rand(3, 2, generator=g), torch.tensor([[2, 2], [0, 3], [3, 1]])
    lim = experts.limit
    assert kernels.moe_native(x, experts.gate_proj, experts.up_proj, experts.down_proj) == (path == "fused")
    want = torch.zeros(3, 32)
    for n in range(3):
        for j in range(2):
            e = ids[n, j]
            gate, up = experts.gate_proj[e] @ x[n], experts.up_proj[e] @ x[n]
            assert lim and gate.max() > lim and up.abs().max() > lim  # the clamp matters
            want[n] += w[n, j] * (experts.down_proj[e] @ (F.silu(gate.clamp(max=lim)) * up.clamp(-lim, lim)))
    with torch.no_grad():
        grouped = experts(x, w, ids)
        for n in range(3):
            one = experts(x[n : n + 1], w[n : n + 1], ids[n : n + 1])
            torch.testing.assert_close(one, grouped[n : n + 1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grouped, want, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_and_decode_match_transformers(v4):
    """Chunks of 5 (dense), 11 and 30 (after a cached prefix, ending mid-window) and 10 single-token decodes over
    scattered pool blocks equal transformers' logits for the whole sequence."""
    _, hf, ours = v4
    chunks, n_decode = [5, 11, 30], 10
    total = sum(chunks) + n_decode
    ids = _ids(total, seed=7)
    (slots,), n_slots = _block_slots([total], seed=0)
    pools = ours.new_kv_pools(n_slots)
    with torch.no_grad():
        got, pos = [], 0
        for n in chunks + [1] * n_decode:
            got.append(ours.logits(ours.hidden_states(ids[pos : pos + n], build_batch([(slots, pos, n)]), pools)))
            pos += n
    assert (torch.cat(got) - _ref(hf, ids)).abs().max().item() <= 1e-4


def test_one_step_with_a_prefill_a_chunk_and_decodes(v4):
    """A dense prefill, a 3-row chunk and two decodes in one flat batch, each against transformers alone."""
    _, hf, ours = v4
    lens, news = [0, 20, 9, 33], [12, 3, 1, 1]
    seqs = [_ids(n + k, seed=200 + n) for n, k in zip(lens, news, strict=True)]
    sizes = [len(s) for s in seqs]
    slot_lists, n_slots = _block_slots(sizes, seed=1)
    pools = ours.new_kv_pools(n_slots)
    with torch.no_grad():
        for s, sl, n in zip(seqs, slot_lists, lens, strict=True):
            if n:
                ours.hidden_states(s[:n], build_batch([(sl, 0, n)]), pools)
        batch = build_batch([(sl, n, k) for sl, n, k in zip(slot_lists, lens, news, strict=True)])
        tokens = torch.cat([s[n:] for s, n in zip(seqs, lens, strict=True)])
        got = ours.logits(ours.hidden_states(tokens, batch, pools)).split(news)
    for s, n, g in zip(seqs, lens, got, strict=True):
        assert (g - _ref(hf, s)[n:]).abs().max().item() <= 1e-4


def test_released_tensor_names_load(v4, tmp_path):
    """The released checkpoints' names (no `model.` prefix, `embed`, `hc_head_fn`, `layers.N.attn.wq_a`, experts'
    w1/w2/w3) load into the same model."""
    folder, hf, ours = v4
    renamed = _released(load_file(folder / "model.safetensors"))
    assert "layers.1.attn.indexer.compressor.wkv.weight" in renamed and "embed.weight" in renamed
    save_file(renamed, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    again = load_checkpoint(tmp_path, dtype="float32", progress=False)
    ids = _ids(40, seed=1)[None]
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))


def _released(tensors: dict) -> dict:
    """transformers' saved names -> the released checkpoints' (save_pretrained writes most of them back)."""
    renamed = {}
    for name, t in tensors.items():
        name = name.removeprefix("model.").replace("embed_tokens.", "embed.")
        name = {"hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base",
                "hc_head.hc_scale": "hc_head_scale"}.get(name, name)
        renamed[name] = t
    return renamed


# ---- the released FP8 / FP4 weights --------------------------------------------------------------------------
# A plain-torch model of the release's encodings: dense projections e4m3 with a ue8m0 scale per 128x128 block,
# routed experts e2m1 pairs in int8 (low nibble the even column) with a ue8m0 scale per 32 values of a row, both
# `X.scale` beside `X.weight` and multiplied; the compressors' and indexer's kv / gate projections stay bf16.
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
FP4_NAMES = re.compile(r"\.experts\.\d+\.w[123]\.weight$")
BF16_NAMES = re.compile(r"compressor\.(wkv|wgate)\.weight$|\.indexer\.weights_proj\.weight$")
FP8_NAMES = re.compile(r"\.(wq_a|wq_b|wkv|wo_a|wo_b|w1|w2|w3)\.weight$")


def _ue8m0(amax: torch.Tensor, top: float) -> torch.Tensor:
    """Exponents of the smallest powers of two s with amax / s <= top (e8m0 bytes: exponent + 127)."""
    return torch.ceil(torch.log2((amax / top).clamp(min=2.0**-100)))


def _expand(s: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    return s.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def _to_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    br, bc = -(-rows // 128), -(-cols // 128)
    padded = torch.zeros(br * 128, bc * 128)
    padded[:rows, :cols] = w
    e = _ue8m0(padded.view(br, 128, bc, 128).abs().amax((1, 3)), 448.0)
    q = (w / _expand(torch.exp2(e), rows, cols, (128, 128))).to(torch.float8_e4m3fn)
    return q, (e + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def _from_fp8(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return q.float() * _expand(s, *q.shape, (128, 128))


def _to_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    e = _ue8m0(w.view(rows, cols // 32, 32).abs().amax(-1), 6.0)
    x = w / _expand(torch.exp2(e), rows, cols, (1, 32))
    codes = (x.abs()[..., None] - E2M1[:8]).abs().argmin(-1) | (x < 0).long() << 3  # nearest e2m1, sign bit 3
    packed = (codes[:, 0::2] | codes[:, 1::2] << 4).to(torch.uint8).view(torch.int8)
    return packed, (e + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def _from_fp4(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    u = q.view(torch.uint8).long()
    values = torch.stack([E2M1[u & 15], E2M1[u >> 4]], dim=-1).view(q.shape[0], -1)
    return values * _expand(s, *values.shape, (1, 32))


def _release_layout(tensors: dict) -> tuple[dict, dict]:
    """Released-name float tensors -> (the release's layout, the same values dequantized to fp32)."""
    packed, plain = {}, {}
    for name, t in tensors.items():
        if FP4_NAMES.search(name) or (FP8_NAMES.search(name) and not BF16_NAMES.search(name)):
            q, s = (_to_fp4 if FP4_NAMES.search(name) else _to_fp8)(t.float())
            packed[name], packed[name.removesuffix("weight") + "scale"] = q, s
            plain[name] = (_from_fp4 if q.dtype == torch.int8 else _from_fp8)(q, s)
        elif BF16_NAMES.search(name):
            packed[name] = t.to(torch.bfloat16)
            plain[name] = packed[name].float()
        else:
            packed[name] = plain[name] = t
    return packed, plain


def _write(folder, tensors: dict, config: dict):
    folder.mkdir(exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def v4_release(tmp_path_factory):
    """A tiny checkpoint in the released layout (experts 32 wide so that every FP4 stack packs), the same values
    dequantized in a float checkpoint, and the released layout's config."""
    hf = _random_hf(moe_intermediate_size=32)
    root = tmp_path_factory.mktemp("v4_release")
    hf.save_pretrained(root / "hf")
    packed, plain = _release_layout(_released(load_file(root / "hf" / "model.safetensors")))
    config = json.loads((root / "hf" / "config.json").read_text())
    quant = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
    folder = _write(root / "fp", packed, {**config, "quantization_config": quant})
    return folder, packed, config, _write(root / "float", plain, config), root / "hf"


def test_released_fp8_fp4_checkpoint_loads_packed(v4_release):
    """FP8 dense projections, FP4 experts and `X.scale` names: loaded packed (never widened), the logits those of
    the model loaded from the dequantized float weights; layers too narrow for a packed kernel, dequantized."""
    folder, packed, _, plain_folder, unquantized = v4_release
    assert any(n.endswith(".scale") and t.dtype == torch.float8_e8m0fnu for n, t in packed.items())
    assert packed["layers.1.ffn.experts.0.w2.weight"].dtype == torch.int8
    ours = load_checkpoint(folder, dtype="float32", progress=False)
    ref = load_checkpoint(plain_folder, dtype="float32", progress=False)
    attn, experts = ours.model.layers[1].self_attn, ours.model.layers[1].mlp.experts
    for layer in (attn.q_a_proj, attn.kv_proj, attn.o_a_proj, ours.model.layers[1].mlp.shared_experts.down_proj):
        assert isinstance(layer, QuantLinear) and layer.bits == "fp8"
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert isinstance(getattr(experts, proj), QuantStack) and getattr(experts, proj).bits == "fp4"
    # bf16 in the release: float; 16 inputs (not a multiple of 32): dequantized into a float layer
    assert type(attn.compressor.kv_proj) is torch.nn.Linear and type(attn.indexer.gate_proj) is torch.nn.Linear
    assert type(attn.q_b_proj) is torch.nn.Linear
    torch.testing.assert_close(attn.q_b_proj.weight, ref.model.layers[1].self_attn.q_b_proj.weight, rtol=0, atol=0)
    ids = _ids(40, seed=3)[None]
    with torch.no_grad():
        got, want = ours(ids), ref(ids)
        before = load_checkpoint(unquantized, dtype="float32", progress=False)(ids)
    assert (got - want).abs().max().item() <= 1e-4
    assert (got - before).abs().max().item() > 1e-2  # rounding to FP8 / FP4 changed them: the values are compared


def test_released_fp8_fp4_checkpoint_dequantized_into_float_layers(v4_release, tmp_path):
    """Where the layers stay float (here: no quantization_config; likewise sharded or off the CPU), the same FP8 /
    FP4 tensors are dequantized on the way in to the same values."""
    _, packed, config, plain_folder, _ = v4_release
    ours = load_checkpoint(_write(tmp_path / "fp", packed, config), dtype="float32", progress=False)
    ref = load_checkpoint(plain_folder, dtype="float32", progress=False)
    assert not any(isinstance(m, QuantLinear | QuantStack) for m in ours.modules())
    for (name, got), want in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("scale", ["layers.1.attn.wq_a.scale", "layers.2.ffn.experts.3.w2.scale"])
def test_malformed_released_scale_names_the_tensor(v4_release, tmp_path, scale):
    folder, packed, config, *_ = v4_release
    bad = {**packed, scale: packed[scale][..., :-1].contiguous() if packed[scale].shape[-1] > 1
           else packed[scale].repeat(1, 2)}
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    _write(tmp_path / "bad", bad, {**config, "quantization_config": quant})
    with pytest.raises(CheckpointError, match=re.escape(f"scale {scale!r} of ") + r".* has shape \[.*\], expected \["):
        load_checkpoint(tmp_path / "bad", dtype="float32", progress=False)


# ---- engine ---------------------------------------------------------------------------------------------------


def test_engine_greedy_matches_transformers_generate(v4):
    """The engine (blocks of 16, 24-token prefill chunks, two sequences batched) decodes as transformers' generate
    with its own compressor cache does; a longer prompt sharing the first's blocks reuses them."""
    folder, hf, _ = v4
    prompts = [_ids(45, seed=2).tolist(), _ids(9, seed=3).tolist()]
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        refs = [hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=10, min_new_tokens=10)[0, len(p):]
                .tolist() for p in prompts]
    llm = LLM(folder, dtype="float32", device="cpu", progress=False, block_size=16, max_num_batched_tokens=24)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == refs
    longer = prompts[0] + refs[0][:7]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([longer]), do_sample=False, max_new_tokens=4, min_new_tokens=4)[0, len(longer):]
    again = llm.generate([longer], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert again.num_cached_tokens >= 48
    assert again.outputs[0].token_ids == ref.tolist()


def test_preemption_under_a_tiny_pool_loses_nothing(v4):
    """Three sequences growing past two 16-token blocks each in a 5-block pool: some are preempted and recomputed."""
    _, _, ours = v4
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [_ids(n, seed=300 + n).tolist() for n in (30, 28, 31)]
    roomy = EngineArgs(enable_prefix_caching=False, kv_cache_memory=1 << 24)
    alone = {f"r{i}": run_to_end(LLMEngine(ours, None, roomy), [p], greedy)["r0"] for i, p in enumerate(prompts)}
    block_bytes = 16 * (ours.kv_values_per_token() + ours.window_values_per_token()) * 4  # a block + its window
    engine = LLMEngine(ours, None, EngineArgs(block_size=16, max_num_batched_tokens=32,
                                              kv_cache_memory=5 * block_bytes))
    assert engine.blocks.num_blocks == engine.blocks.num_window_blocks == 5
    _poison_free_windows(engine)
    assert run_to_end(engine, prompts, greedy) == alone
    assert engine.scheduler.num_preemptions > 0


# ---- KV cache arithmetic ----------------------------------------------------------------------------------------


def _kv_bytes_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "kv_bytes.py"
    spec = importlib.util.spec_from_file_location("kv_bytes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_engine_pool_bytes_are_what_kv_bytes_predicts(v4):
    """The engine's allocated pools (fp32): entries for every block (what kv_bytes_per_token counts) plus window rows
    for its window blocks only; V4-Flash's per-token widths and benchmarks/kv_bytes.py's figure from the allocator at
    1M tokens equal their arithmetic; rows off the 16-aligned layout are refused."""
    _, _, ours = v4
    engine = LLMEngine(ours, None, EngineArgs(block_size=32, kv_cache_memory=1 << 22))
    b = engine.blocks
    assert engine.kv_bytes_per_token == ours.kv_values_per_token() * 4 == (2 * 4 * (32 + 16) + 2 * 32) // 16 * 4
    # window blocks: each sequence's tail + a step's 512 tokens (64 * 3 + 16), within what the budget gives a block
    # and its window together; the blocks get the rest, and both pools together stay within kv_cache_memory
    block, window = 32 * engine.kv_bytes_per_token, 32 * ours.window_values_per_token() * 4
    assert b.num_window_blocks == min(64 * 3 + 16, (1 << 22) // (block + window)) < b.num_blocks
    window_bytes = b.num_window_blocks * window
    assert b.num_blocks == ((1 << 22) - window_bytes) // block
    assert sum(p.nbytes for p in engine.runner.pools) == b.num_blocks * block + window_bytes <= 1 << 22
    roomy = LLMEngine(ours, None, EngineArgs(block_size=32, kv_cache_memory=1 << 25)).blocks
    assert roomy.num_window_blocks == 64 * 3 + 16 < roomy.num_blocks
    with pytest.raises(ValueError, match="too small for DeepSeek-V4"):
        LLMEngine(ours, None, EngineArgs(block_size=32, kv_cache_memory=2 * block))
    flash = ModelConfig.from_dict(_kv_bytes_module().V4_FLASH)
    with torch.device("meta"):
        attn = {lt: deepseek_v4.V4Attention(flash, lt) for lt in set(flash.v4.layer_types)}
    # per token: window rows (KV | C, Z | indexer C, Z) and entries (ceil(16 / m) per 16 slots); lookback 127
    assert sum(attn[lt].token_width for lt in flash.v4.layer_types) == 2 * 512 + 21 * 3072 + 20 * 1536 == 96256
    assert sum(attn[lt].group_cols for lt in flash.v4.layer_types) == 21 * 4 * 640 / 16 + 20 * 512 / 16 == 4000
    assert max(a.lookback for a in attn.values()) == 127
    n = 1 << 20  # blocks of 64: the last two hold positions n - 127 .. n - 1
    assert _kv_bytes_module().selfseek_pool_bytes(flash, n) == pytest.approx(4000 + 2 * 64 * 96256 / n)
    pools = ours.new_kv_pools(64)
    with pytest.raises(ValueError, match="block_size"):
        ours.hidden_states(_ids(20, seed=1), build_batch([(torch.arange(20) + 8, 0, 20)]), pools)


def _poison_free_windows(engine: LLMEngine) -> list:
    """After every step, NaN in every window block no sequence holds (a read of a released row shows in the tokens),
    but those of blocks in the prefix cache (a hit may read them); -> [(scheduled sequence, its num_computed, its
    blocks, window-holding block-table indices)] per step, as scheduled."""
    b, steps = engine.blocks, []
    pools = engine.runner.pools + ([engine.speculative.mtp_pool] if engine.speculative else [])
    schedule, step = engine.scheduler.schedule, engine.step

    def scheduled():
        out = schedule()
        steps.append([(s.seq, s.seq.num_computed, len(s.seq.block_table),
                       [i for i, blk in enumerate(s.seq.block_table) if b.window_ref[blk]]) for s in out])
        return out

    def poisoned():
        deltas = step()
        free = torch.tensor([w for w in b.free_windows if b.window_owner[w] < 0 or
                             b.key_of[b.window_owner[w]] is None], dtype=torch.long)
        rows = (free[:, None] * b.block_size + torch.arange(b.block_size)).flatten()
        for pool in pools:
            pool.window[rows] = float("nan")
        return deltas

    engine.scheduler.schedule, engine.step = scheduled, poisoned
    return steps


def test_window_blocks_only_for_the_last_positions(v4):
    """Prompts of several sliding windows in a window pool of 7 blocks (reused many times over, released rows
    poisoned): greedy tokens equal transformers', each step holds window rows only from the block of position
    num_computed - lookback (7) on, and a finished sequence holds none."""
    folder, hf, ours = v4
    prompts = [_ids(100, seed=21).tolist(), _ids(70, seed=22).tolist()]
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        refs = [hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=12, min_new_tokens=12)[0, len(p):]
                .tolist() for p in prompts]
    engine = LLMEngine(ours, None, EngineArgs(block_size=16, max_num_seqs=2, max_num_batched_tokens=16,
                                              enable_prefix_caching=False, kv_cache_memory=1 << 22))
    b = engine.blocks
    assert ours.lookback == 7 and b.num_window_blocks == 2 * (1 + 2) + 1 < b.num_blocks
    steps = _poison_free_windows(engine)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert run_to_end(engine, prompts, greedy) == {"r0": refs[0], "r1": refs[1]}
    decodes = 0
    for seq, computed, n_blocks, held in (x for step in steps for x in step):
        assert held == list(range(max(0, computed - 7) // 16, n_blocks))
        if computed >= len(seq.prompt_ids):  # decoding: one block, or two when the lookback crosses a block boundary
            decodes += 1
            assert len(held) == 1 + (computed % 16 < 7)
    assert decodes == 2 * 11
    assert len(b.free_windows) == b.num_window_blocks and not any(b.window_ref) and not b.window_start
    stats = engine.stats()
    assert [stats[f"kv_window_blocks_{k}"] for k in ("total", "used", "free")] == [7, 0, 7]


def test_kv_bytes_per_token_arithmetic():
    """V4-Flash-shaped (43 layers: 2 SWA then CSA/HCA, W = 128, D = 512, indexer 128) against V3's latent (61 x 576)."""
    flash = ModelConfig.from_dict(dict(model_type="deepseek_v4", vocab_size=129280, hidden_size=4096,
                                       num_hidden_layers=43, num_attention_heads=64, moe_intermediate_size=2048,
                                       compress_ratios=[0, 0] + [4, 128] * 20 + [4, 0]))
    v4 = flash.v4
    assert v4.layer_types.count("compressed_sparse_attention") == 21
    assert v4.layer_types.count("heavily_compressed_attention") == 20
    n = 1 << 20
    per_csa = 128 * 512 + (n // 4) * (512 + 128)
    per_hca = 128 * 512 + (n // 128) * 512
    expect = (2 * 128 * 512 + 21 * per_csa + 20 * per_hca) / n
    assert deepseek_v4.kv_bytes_per_token(flash, n) == pytest.approx(expect)
    v3 = ModelConfig.from_dict(dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168,
                                    intermediate_size=18432, num_hidden_layers=61, num_attention_heads=128,
                                    kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
                                    v_head_dim=128))
    assert deepseek_v4.kv_bytes_per_token(v3, n) == 61 * 576
    assert deepseek_v4.kv_bytes_per_token(flash, n) < 0.5 * deepseek_v4.kv_bytes_per_token(v3, n)


# ---- multi-token prediction -------------------------------------------------------------------------------------


def _with_mtp(folder, out):
    """The checkpoint plus an MTP module in the released names (mtp.0.*: a sliding-window block with a non-hashed
    MoE, its enorm / hnorm / e_proj / h_proj / norm / hc_head), random."""
    tensors = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    mtp = {}
    for name, t in tensors.items():
        for src, keep in (("model.layers.0.", ("attn.", "attn_norm", "hc_attn")),
                          ("model.layers.2.", ("ffn.", "ffn_norm", "hc_ffn"))):
            if name.startswith(src) and name[len(src):].startswith(keep):
                mtp["mtp.0." + name[len(src):]] = t
    m = 32
    for own, shape in (("enorm.weight", (m,)), ("hnorm.weight", (m,)), ("norm.weight", (m,)), ("e_proj.weight", (m, m)),
                       ("h_proj.weight", (m, m)), ("hc_head_fn", (3, 3 * m)), ("hc_head_base", (3,)),
                       ("hc_head_scale", (1,))):
        mtp["mtp.0." + own] = torch.zeros(shape)
    for name, t in mtp.items():  # fresh values, so nothing passes by equalling the main layers
        scale = 0.1 if name.endswith("norm.weight") else (0.5 if t.dim() < 2 else t.shape[-1] ** -0.5)
        mtp[name] = (1.0 if name.endswith("norm.weight") else 0.0) + scale * torch.randn(t.shape, generator=g)
    save_file({**tensors, **mtp}, out / "model.safetensors")
    (out / "config.json").write_text((folder / "config.json").read_text())
    return mtp


def _rms(x, w, eps=1e-6):
    return w * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


@pytest.fixture(scope="module")
def v4_mtp(v4, tmp_path_factory):
    folder = tmp_path_factory.mktemp("v4_mtp")
    weights = _with_mtp(v4[0], folder)
    return weights, load_checkpoint(folder, dtype="float32", progress=False)


def test_mtp_matches_the_formulas(v4, v4_mtp):
    """V4's MTP (DeepSeek's MTPBlock): X = W^E enorm(Emb(t+1)) + W^H hnorm(H), X' = Block(X), logits =
    head(norm(hc_head'(X'))), with H the main model's last streams (taken from transformers) and Block
    transformers' own decoder layer; in whole sequences and chunk by chunk through a cache."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hfm

    _, hf, _ = v4
    w, ours = v4_mtp
    assert len(ours.mtp) == 1 and ours.mtp[0].block.self_attn.layer_type == "sliding_attention"
    n = 30
    ids = _ids(n + 1, seed=9)
    streams = {}
    hook = hf.model.hc_head.register_forward_hook(lambda mod, args, out: streams.setdefault("h", args[0]))
    with torch.no_grad():
        hf(ids[None, :n], use_cache=False)
    hook.remove()
    h = streams["h"][0]  # [s, n_hc, m]
    # the block: transformers' layer, given the MTP block's weights
    cfg = hfm.DeepseekV4Config(**{**TINY, "num_hidden_layers": 1, "layer_types": ["sliding_attention"],
                                  "mlp_layer_types": ["moe"]})
    layer = hfm.DeepseekV4DecoderLayer(cfg, 0).eval()
    sd = {k: v for k, v in ours.mtp[0].block.state_dict().items() if ".experts." not in k}
    ex = ours.mtp[0].block.mlp.experts
    sd["mlp.experts.gate_up_proj"] = torch.cat([ex.gate_proj, ex.up_proj], dim=1)
    sd["mlp.experts.down_proj"] = ex.down_proj
    layer.load_state_dict(sd, strict=True)
    rotary = hfm.DeepseekV4RotaryEmbedding(cfg)
    pos = torch.arange(n)[None]
    emb = hf.model.embed_tokens(ids[1:][None])[0]
    with torch.no_grad():
        x = (_rms(emb, w["mtp.0.enorm.weight"]) @ w["mtp.0.e_proj.weight"].T)[:, None, :] + (
            _rms(h, w["mtp.0.hnorm.weight"]) @ w["mtp.0.h_proj.weight"].T)
        i, j = pos[0][:, None], pos[0][None, :]
        mask = torch.where((j <= i) & (j > i - WINDOW), 0.0, float("-inf"))[None, None]
        pe = {k: rotary(x, pos, layer_type=k) for k in ("main", "compress")}
        y = layer(x[None], input_ids=ids[1:][None], position_embeddings=pe, position_ids=pos, attention_mask=mask)[0]
        flat = y.flatten(1)
        mix = (flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + 1e-6)) @ w["mtp.0.hc_head_fn"].T
        pre = torch.sigmoid(mix * w["mtp.0.hc_head_scale"] + w["mtp.0.hc_head_base"]) + 1e-6
        ref = _rms((pre[..., None] * y).sum(1), w["mtp.0.norm.weight"]) @ hf.lm_head.weight.T
        ours_h = ours.hidden_states(ids[None, :n])
        assert (ours_h[0] - h).abs().max().item() <= 1e-4
        got = ours.mtp_logits(ours_h, ids[None, 1:])[0]
        assert (got - ref).abs().max().item() <= 1e-4
        # chunk by chunk through the MTP module's own pool, as the engine's drafting does
        (slots,), n_slots = _block_slots([n], seed=1)
        pool = ours.mtp[0].block.self_attn.new_pool(n_slots, torch.float32, "cpu")
        parts, p = [], 0
        for k in (7, 12, 1, 1, 9):
            x_k = ours.mtp_hidden(ours_h[0, p : p + k], ids[1 + p : 1 + p + k], build_batch([(slots, p, k)]), pool)
            parts.append(ours.draft_logits(x_k))
            p += k
        assert (torch.cat(parts) - ref).abs().max().item() <= 1e-4


def test_speculative_decoding_with_the_mtp_module_is_exact(v4_mtp):
    """Drafts from V4's MTP module, verified in the main forward, leave greedy tokens as they are without them, with
    released window rows (main and MTP pools) poisoned."""
    _, model = v4_mtp
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [_ids(n, seed=400 + n).tolist() for n in (37, 6)]
    args = dict(kv_cache_memory=1 << 24, block_size=16, max_num_batched_tokens=32, max_num_seqs=2)
    want = run_to_end(LLMEngine(model, None, EngineArgs(**args)), prompts, greedy)
    engine = LLMEngine(model, None, EngineArgs(**args, speculative_tokens=2))
    assert engine.blocks.num_window_blocks == 2 * (1 + 2) + 2
    _poison_free_windows(engine)
    assert run_to_end(engine, prompts, greedy) == want
    assert engine.stats()["spec_verify_steps"] > 0
