"""DeepSeek-V3.2 (DeepSeek Sparse Attention): config, logit parity with transformers' DeepseekV32 in prefill,
chunked prefill and decode (index_topk 6, so contexts beyond it really attend sparsely), the engine end to end,
and a served V3.2 model speaking its DSML tool format."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoints import EXTRA_FAMILIES, VOCAB, build_hf_model

from selfseek import LLM, SamplingParams
from selfseek.config import ConfigError, ModelConfig
from selfseek.models.batch import build_batch
from selfseek.weights.safetensors import load_checkpoint

TOPK = EXTRA_FAMILIES["v32_dsa"][1]["index_topk"]


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(2, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def v32(tmp_path_factory):
    folder = tmp_path_factory.mktemp("v32_dsa")
    hf = build_hf_model("v32_dsa")
    hf.save_pretrained(folder)
    return folder, hf, load_checkpoint(folder, dtype="float32", progress=False)


# ---- config -------------------------------------------------------------------------------------------------


def test_config_reads_the_indexer_fields_and_rejects_what_it_cannot_run(v32):
    folder, _, model = v32
    d = json.loads((folder / "config.json").read_text())
    cfg = ModelConfig.from_dict(d)
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == (16, 32, TOPK)
    assert cfg.is_mla and cfg.topk_method == "noaux_tc" and cfg.scoring_func == "sigmoid"
    # the pool row: latent, roped key, then the indexer key
    assert cfg.kv_values_per_token_per_layer == 32 + 8 + 32
    assert model.new_kv_pools(4)[0].shape == (4, 32 + 8 + 32)
    released = {k: v for k, v in d.items() if not k.startswith("index_")}
    assert ModelConfig.from_dict(released).index_topk == 2048  # the released V3.2 values by default
    bad = [
        ({"index_window": 4}, "index_window"),
        ({"mlp_layer_types": ["sparse"] * 3}, "mlp_layer_types"),
        ({"q_lora_rank": None}, "q_lora_rank"),
        ({"index_head_dim": 8}, "index_head_dim"),
        ({"index_topk": 0}, "index_topk"),
        ({"index_n_heads": 2.5}, "index_n_heads"),
    ]
    for change, field in bad:
        with pytest.raises(ConfigError, match=field):
            ModelConfig.from_dict({**d, **change})
    with pytest.raises(ConfigError, match="index_topk"):  # V3 has no indexer
        ModelConfig.from_dict({**d, "model_type": "deepseek_v3"})


# ---- parity with transformers --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [TOPK - 1, 40, 96])
def test_prefill_logits_match_transformers_fp32(v32, n):
    _, hf, ours = v32
    ids = _ids(n, seed=n)
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    assert (got - ref).abs().max().item() <= 1e-4


def test_the_sparse_selection_changes_the_logits(v32):
    """With index_topk beyond the context attention is dense: the parity above would catch ignoring the indexer."""
    _, hf, ours = v32
    ids = _ids(40, seed=40)
    with torch.no_grad():
        sparse = ours(ids)
        for layer in ours.model.layers:
            layer.self_attn.indexer.topk = 10**6
        try:
            dense = ours(ids)
        finally:
            for layer in ours.model.layers:
                layer.self_attn.indexer.topk = TOPK
    assert (dense - sparse)[:, :TOPK].abs().max().item() <= 1e-5  # rows seeing <= top-k keys: dense anyway
    assert (dense - sparse)[:, TOPK:].abs().max().item() > 1e-2


@pytest.mark.parametrize("mode", ["absorbed", "expanded"])
def test_chunked_prefill_and_decode_match_transformers(v32, mode):
    """Chunks of 10 (dense), 20 and 70 (after a cached prefix: absorbed then, at >= 64 rows, expanded) and 12
    single-token decodes, over scattered pool slots, equal transformers' logits for the whole sequence."""
    _, hf, ours = v32
    chunks, n_decode = [10, 20, 70], 12
    total = sum(chunks) + n_decode
    ids = _ids(total, seed=7)[0]
    slots = torch.randperm(2 * total, generator=torch.Generator().manual_seed(0))[:total]
    pools = ours.new_kv_pools(2 * total)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        got, pos = [], 0
        for n in chunks + [1] * n_decode:
            batch = build_batch([(slots, pos, n)], decode_mode=mode)
            got.append(ours.logits(ours.hidden_states(ids[pos : pos + n], batch, pools)))
            pos += n
    assert (torch.cat(got) - ref).abs().max().item() <= 1e-4


def test_batched_decode_of_sequences_shorter_and_longer_than_topk(v32):
    """One step decoding a short and a long sequence together (the long one gathers its top-k, the short one
    sees all) and a 3-row chunk, against transformers on each sequence alone."""
    _, hf, ours = v32
    lens = [TOPK - 2, 30, 50]
    news = [1, 1, 3]
    seqs = [_ids(n + k, seed=100 + n)[0] for n, k in zip(lens, news, strict=True)]
    pools = ours.new_kv_pools(sum(len(s) for s in seqs))
    slot_lists = list(torch.arange(sum(len(s) for s in seqs)).split([len(s) for s in seqs]))
    with torch.no_grad():
        for s, sl, n in zip(seqs, slot_lists, lens, strict=True):  # prefill each alone
            ours.hidden_states(s[:n], build_batch([(sl, 0, n)]), pools)
        batch = build_batch([(sl, n, k) for sl, n, k in zip(slot_lists, lens, news, strict=True)])
        tokens = torch.cat([s[n:] for s, n in zip(seqs, lens, strict=True)])
        got = ours.logits(ours.hidden_states(tokens, batch, pools)).split(news)
        for s, n, g in zip(seqs, lens, got, strict=True):
            ref = hf(s[None]).logits[0, n:]
            assert (g - ref).abs().max().item() <= 1e-4


def test_engine_greedy_matches_transformers_generate(v32):
    """The engine (paged blocks of 16, 32-token prefill chunks, two sequences batched) decodes as transformers'
    generate with its own indexer cache does."""
    folder, hf, _ = v32
    prompts = [_ids(45, seed=2)[0].tolist(), _ids(9, seed=3)[0].tolist()]
    hf.generation_config.eos_token_id = None
    refs = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=20, min_new_tokens=20)
            refs.append(out[0, len(p):].tolist())
    llm = LLM(folder, dtype="float32", device="cpu", progress=False, block_size=16, max_num_batched_tokens=32)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == refs
    # the first prompt again, extended: its cached blocks (latent and indexer keys) are reused
    longer = prompts[0] + refs[0][:5]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([longer]), do_sample=False, max_new_tokens=10, min_new_tokens=10)
    again = llm.generate([longer], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert again.num_cached_tokens >= 48
    assert again.outputs[0].token_ids == ref[0, len(longer):].tolist()


# ---- served ---------------------------------------------------------------------------------------------------


def test_a_served_v32_model_renders_dsml_tools(tmp_path):
    """A V3.2 checkpoint with V3.2's real tokenizer (no Jinja template) is served with the V3.2 encoder and
    DSML tool format, end to end through the engine."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    import transformers
    from server_helpers import LiveServer, deepseek_tokenizer, write_tokenizer

    from selfseek.server import build_service, create_app
    from selfseek.server.tools import Function

    vocab = write_tokenizer("deepseek-v3.2", tmp_path)
    tok = deepseek_tokenizer("deepseek-v3.2")
    cfg = transformers.DeepseekV32Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
        v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_group=2, topk_group=1, index_n_heads=4, index_head_dim=16, index_topk=8, max_position_embeddings=1024,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp_path)
    svc = build_service(str(tmp_path), "float32", "cpu", "v32", {"kv_cache_memory": 16 << 20, "max_model_len": 512,
                                                                 "block_size": 16})
    try:
        assert getattr(svc.tool_format, "name", svc.tool_format) == "deepseek_v32"  # a ToolFormat (or its name)
        weather = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        prompt = svc.chat_prompt([{"role": "user", "content": "Weather in Paris?"}],
                                 [Function("get_weather", "Weather.", weather)], None, None, None)
        ids = svc.encode_prompt(prompt, "messages")
        text = tok.decode(ids, skip_special_tokens=False)
        assert "｜DSML｜" in text and "get_weather" in text
        server = LiveServer(create_app(svc))
        try:
            r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
                "model": "v32", "messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 8,
                "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                                            "parameters": weather}}]})
        finally:
            server.stop()
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(ids)
        assert r.json()["usage"]["completion_tokens"] >= 1
    finally:
        svc.engine.shutdown()


def test_selection_in_row_blocks_equals_one_block(v32):
    """Long contexts score the query rows in blocks (bounded memory): the picks are the same."""
    _, _, ours = v32
    indexer = ours.model.layers[1].self_attn.indexer
    g = torch.Generator().manual_seed(5)
    q, w = torch.randn(40, 16, 32, generator=g), torch.randn(40, 16, generator=g)
    keys = torch.randn(40, 32, generator=g)
    whole = indexer.select(q, w, keys)
    indexer.SCORE_BUDGET = 16 * 40 * 3  # 3 rows per block
    try:
        blocked = indexer.select(q, w, keys)
    finally:
        del indexer.SCORE_BUDGET
    assert torch.equal(whole[0], blocked[0]) and torch.equal(whole[1], blocked[1])
    assert whole[0].shape == (40, TOPK)
    assert whole[1].sum(1).tolist() == [min(i + 1, TOPK) for i in range(40)]  # row i sees keys 0..i


def test_mtp_layer_with_its_indexer_loads_beside_the_decoder(v32, tmp_path):
    """Released V3.2 checkpoints carry MTP as model.layers.{L}.*, its block with an indexer of its own."""
    from safetensors.torch import load_file, save_file

    src, hf, _ = v32
    state = load_file(src / "model.safetensors")
    n, h = hf.config.num_hidden_layers, hf.config.hidden_size
    torch.manual_seed(7)
    for name in [k for k in state if k.startswith(f"model.layers.{n - 1}.")]:
        state[name.replace(f"layers.{n - 1}.", f"layers.{n}.")] = torch.randn_like(state[name]) * 0.05
    mtp = f"model.layers.{n}."
    state.update({mtp + "enorm.weight": torch.ones(h), mtp + "hnorm.weight": torch.ones(h),
                  mtp + "eh_proj.weight": torch.randn(h, 2 * h) * 0.05, mtp + "shared_head.norm.weight": torch.ones(h),
                  mtp + "shared_head.head.weight": state["lm_head.weight"].clone(),
                  mtp + "embed_tokens.weight": state["model.embed_tokens.weight"].clone()})
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    ours = load_checkpoint(tmp_path, progress=False)
    assert len(ours.mtp) == 1
    assert torch.equal(ours.mtp[0].block.self_attn.indexer.wq_b.weight, state[mtp + "self_attn.indexer.wq_b.weight"])
    ids = _ids(20, seed=8)
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4
        draft = ours.mtp_logits(ours.hidden_states(ids[:, :-1]), ids[:, 1:])
    assert draft.shape == (1, 19, VOCAB) and torch.isfinite(draft).all()
