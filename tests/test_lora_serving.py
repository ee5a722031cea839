"""Serving several PEFT LoRA adapters on one base (models/lora_serving.py, the hook in models/layers.py): each
adapter against transformers + peft with the same adapter folder, batches that mix adapters and the base, the
prefix cache keyed per adapter, bad adapter folders, and a live server picking the adapter by `model`."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from checkpoints import add_tokenizer, build_hf_model  # noqa: E402

from selfseek import LLM, SamplingParams  # noqa: E402
from selfseek.engine.errors import RequestError  # noqa: E402
from selfseek.models.layers import fused_rows  # noqa: E402
from selfseek.models.lora_serving import LoRAError, LoRARegistry  # noqa: E402

peft = pytest.importorskip("peft")

ENGINE = {"kv_cache_memory": 8 << 20, "block_size": 16, "max_model_len": 256}
PROMPTS = [[5, 17, 42, 99, 7, 300, 12], [3, 8, 250, 61, 77, 19, 4, 90, 120, 31, 2], [200, 201, 13]]
STEPS = 8
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
# adapter name -> (LoraConfig kwargs, seed): all attention and MLP projections with a plain alpha / r; a subset
# (q/v only, so q/k/v's fused GEMM has parts without an adapter) with rsLoRA and a per-module alpha
ADAPTERS = {
    "all": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"]), 1),
    "qv": (dict(r=6, lora_alpha=12, use_rslora=True, alpha_pattern={"v_proj": 3.0},
                target_modules=["q_proj", "v_proj", "up_proj"]), 2),
}


def _peft_adapter(base, out: Path, kwargs: dict, seed: int) -> None:
    """A PEFT folder written by peft itself, with random non-zero A and B (B is zero at a fresh init)."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(init_lora_weights=False, lora_dropout=0.0, **kwargs)
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out)
    model.unload()  # the base back as it was, for the next adapter


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = build_hf_model("qwen2")  # q/k/v biases, GQA, tied embeddings
    base.save_pretrained(root / "base")
    add_tokenizer(root / "base")
    cfg = json.loads((root / "base" / "tokenizer_config.json").read_text())
    (root / "base" / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    paths = {}
    for name, (kwargs, seed) in ADAPTERS.items():
        paths[name] = root / name
        _peft_adapter(base, paths[name], kwargs, seed)
    llm = LLM(str(root / "base"), dtype="float32", device="cpu", progress=False,
              lora={k: str(v) for k, v in paths.items()}, **ENGINE)
    return root, base, paths, llm


def _hf_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs by recomputing the whole sequence each step (the plain reference)."""
    ids, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            t = int(lp.argmax())
            ids.append(t)
            lps.append(float(lp[t]))
    return ids[len(prompt):], lps


def _greedy(llm: LLM, prompts, lora: list[str | None]) -> list[tuple[list[int], list[float]]]:
    params = [SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=0, lora_name=name)
              for name in lora]
    outs = llm.generate(prompts, params)
    res = []
    for o in outs:
        c = o.outputs[0]
        res.append((c.token_ids, [lp[t] for t, lp in zip(c.token_ids, c.logprobs, strict=True)]))
    return res


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_matches_peft(setup, name):
    """Served alone, each adapter gives transformers + peft's greedy tokens and logprobs (fp32, 1e-4)."""
    _, base, paths, llm = setup
    ref_model = peft.PeftModel.from_pretrained(base, paths[name]).eval()
    try:
        for prompt in PROMPTS[:1] if name == "qv" else PROMPTS[:2]:
            want_ids, want_lps = _hf_greedy(ref_model, prompt, STEPS)
            (got_ids, got_lps), = _greedy(llm, [prompt], [name])
            assert got_ids == want_ids
            assert max(abs(a - b) for a, b in zip(got_lps, want_lps, strict=True)) <= 1e-4
    finally:
        ref_model.unload()
    # the adapter changes the answer (else this test could not fail), and the base stays the base
    base_ids, _ = _hf_greedy(base, PROMPTS[0], STEPS)
    assert _greedy(llm, [PROMPTS[0]], [None])[0][0] == base_ids


def test_adapter_on_int8_base_matches_peft(setup):
    """Over int8 block-quantized weights (QLoRA-style serving: the base stays packed) each adapter matches peft on
    a transformers model holding the same dequantized weights (fp32, 1e-4)."""
    import copy

    from selfseek.models.quant import QuantEmbedding, QuantLinear

    root, base, paths, _ = setup
    llm = LLM(str(root / "base"), dtype="float32", device="cpu", progress=False, quantize=8,
              lora={"all": str(paths["all"])}, **ENGINE)
    hf = copy.deepcopy(base)
    quantized = [(n, m) for n, m in llm.model.named_modules() if isinstance(m, QuantLinear | QuantEmbedding)]
    assert any(n.endswith("mlp.gate_proj") for n, _ in quantized)  # the fused gate/up GEMM runs on int8 blocks
    with torch.no_grad():
        for name, module in quantized:
            hf.get_submodule(name).weight.copy_(module.weight.float())
    ref = peft.PeftModel.from_pretrained(hf, paths["all"]).eval()
    want_ids, want_lps = _hf_greedy(ref, PROMPTS[1], STEPS)
    (got_ids, got_lps), = _greedy(llm, [PROMPTS[1]], ["all"])
    assert got_ids == want_ids
    assert max(abs(a - b) for a, b in zip(got_lps, want_lps, strict=True)) <= 1e-4


def test_fused_layers_carry_the_adapters(setup):
    """q/k/v and gate/up still run as one fused GEMM with adapters loaded (the LoRA lands on each part's rows)."""
    _, _, _, llm = setup
    layer = llm.model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    with torch.inference_mode():
        assert fused_rows(attn, (attn.q_proj, attn.k_proj, attn.v_proj)) is not None
        assert fused_rows(mlp, (mlp.gate_proj, mlp.up_proj)) is not None


def test_mixed_batch_equals_each_alone(setup):
    """One batch of sequences under two adapters and none: each row gets its own answer, in as many steps as
    one sequence alone (one batched forward per step, not one per adapter)."""
    _, _, _, llm = setup
    names = ["all", None, "qv", "all"]
    prompts = [PROMPTS[i % 3] for i in range(len(names))]
    alone = [_greedy(llm, [p], [n])[0] for p, n in zip(prompts, names, strict=True)]
    steps0 = llm.engine.timings["steps"]
    mixed = _greedy(llm, prompts, names)
    steps = llm.engine.timings["steps"] - steps0
    for (a_ids, a_lps), (m_ids, m_lps) in zip(alone, mixed, strict=True):
        assert m_ids == a_ids
        assert max(abs(a - b) for a, b in zip(a_lps, m_lps, strict=True)) <= 1e-4
    assert steps == STEPS  # every prompt prefills in the first step
    assert len({tuple(ids) for ids, _ in mixed[:3]}) == 3  # the three answers differ


def test_prefix_cache_is_per_adapter(setup):
    """The same prompt under another adapter shares no cached block; under the same adapter it does."""
    _, _, _, llm = setup
    prompt = list(range(20, 60))  # 40 tokens: two full blocks of 16
    params = {n: SamplingParams(temperature=0, max_tokens=2, lora_name=n) for n in ("all", "qv")}
    first = llm.generate([prompt], params["all"])[0]
    assert first.num_cached_tokens == 0
    assert llm.generate([prompt], params["qv"])[0].num_cached_tokens == 0
    assert llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2))[0].num_cached_tokens == 0
    again = llm.generate([prompt], params["all"])[0]
    assert again.num_cached_tokens == 32
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_unknown_adapter_is_a_request_error(setup):
    _, _, _, llm = setup
    with pytest.raises(RequestError, match="no LoRA adapter named 'nope'") as e:
        llm.generate([PROMPTS[0]], SamplingParams(max_tokens=1), lora_name="nope")
    assert e.value.param == "lora_name"


def test_bad_adapter_folders(setup, tmp_path):
    """An adapter for another base, an unsupported PEFT option, a missing file: errors naming file and field."""
    _, _, paths, llm = setup
    registry = LoRARegistry(llm.model)
    shutil.copytree(paths["all"], tmp_path / "dora")
    cfg = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoRAError, match="use_dora"):
        registry.add("dora", tmp_path / "dora")
    with pytest.raises(LoRAError, match="no adapter_config.json"):
        registry.add("empty", tmp_path / "empty")
    # same module names, other sizes: named tensor and both shapes
    wide = build_hf_model("qwen3")  # head_dim 32: q_proj is 64 -> 128, not 64 -> 64
    wide_peft = peft.get_peft_model(wide, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    wide_peft.save_pretrained(tmp_path / "wide")
    with pytest.raises(LoRAError, match=r"q_proj\.lora_\{A,B\}.*another base model"):
        registry.add("wide", tmp_path / "wide")
    assert not registry.names()  # nothing half-loaded


def test_server_picks_the_adapter_by_model(setup):
    """A live server with two adapters: /v1/models lists them, the openai client's `model` picks one (the same
    answer as LLM.generate under it), the Ollama and Anthropic routes take the same names, an unknown name is
    OpenAI's 404 naming the field."""
    import httpx
    import openai
    from server_helpers import LiveServer

    from selfseek.server import build_service, create_app

    root, _, paths, llm = setup
    svc = build_service(str(root / "base"), "float32", "cpu", "base",
                        {**ENGINE, "lora": [(k, str(v)) for k, v in paths.items()]})
    server = LiveServer(create_app(svc))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        assert [m.id for m in client.models.list().data][:3] == ["base", "all", "qv"]
        prompt = "The quick brown fox"
        want = {n: llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                                lora_name=n)[0].outputs[0].text for n in ("all", "qv", None)}
        assert len(set(want.values())) == 3
        for name in ("all", "qv", "base"):
            r = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True})
            assert r.choices[0].text == want[None if name == "base" else name]
        ollama = httpx.post(f"{server.url}/api/generate", json={
            "model": "qv", "prompt": prompt, "raw": True, "stream": False,
            "options": {"temperature": 0, "num_predict": 6}}).json()
        assert ollama["response"] and want["qv"].startswith(ollama["response"])
        chat = client.chat.completions.create(model="all", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=5, temperature=0)
        anthropic = httpx.post(f"{server.url}/anthropic/v1/messages", json={
            "model": "all", "max_tokens": 5, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-api-key": "none", "anthropic-version": "2023-06-01"}).json()
        assert anthropic["content"][0]["text"] == chat.choices[0].message.content
        ollama_chat = httpx.post(f"{server.url}/api/chat", json={
            "model": "all", "stream": False, "messages": [{"role": "user", "content": "hi"}],
            "options": {"temperature": 0, "num_predict": 5}}).json()
        assert ollama_chat["message"]["content"] == chat.choices[0].message.content
        base_chat = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=5, temperature=0)
        assert base_chat.choices[0].message.content != chat.choices[0].message.content
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model="nope", prompt=prompt, max_tokens=1)
        assert e.value.body["param"] == "model"
    finally:
        server.stop()
        svc.engine.shutdown()


def test_mla_adapter_matches_peft(tmp_path):
    """DeepSeek-V3 (MLA): adapters on q_a_proj and kv_a_proj_with_mqa (one fused GEMM here), q_b_proj and o_proj
    match peft; kv_b_proj (absorbed into the decode attention) and the routed experts are refused by name."""
    base = build_hf_model("v3_noaux")
    base.save_pretrained(tmp_path / "base")
    _peft_adapter(base, tmp_path / "attn", dict(r=4, lora_alpha=8, target_modules=[
        "q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "o_proj"]), 3)
    _peft_adapter(base, tmp_path / "kv_b", dict(r=2, target_modules=["kv_b_proj"]), 4)
    _peft_adapter(base, tmp_path / "experts", dict(r=2, target_modules=["gate_proj", "up_proj", "down_proj"]), 5)
    llm = LLM(str(tmp_path / "base"), dtype="float32", device="cpu", progress=False,
              lora={"attn": str(tmp_path / "attn")}, **ENGINE)
    ref = peft.PeftModel.from_pretrained(base, tmp_path / "attn").eval()
    want_ids, want_lps = _hf_greedy(ref, PROMPTS[0], STEPS)
    ref.unload()
    (got_ids, got_lps), = _greedy(llm, [PROMPTS[0]], ["attn"])
    assert got_ids == want_ids
    assert max(abs(a - b) for a, b in zip(got_lps, want_lps, strict=True)) <= 1e-4
    assert _greedy(llm, [PROMPTS[0]], [None])[0][0] == _hf_greedy(base, PROMPTS[0], STEPS)[0]
    with pytest.raises(LoRAError, match=r"kv_b_proj\.lora_\{A,B\}.*absorbs"):
        llm.engine.loras.add("kv_b", tmp_path / "kv_b")
    with pytest.raises(LoRAError, match=r"mlp\.experts.*routed experts"):
        llm.engine.loras.add("experts", tmp_path / "experts")
    assert llm.engine.loras.names() == ["attn"]


def test_rows_grouped_by_adapter():
    """A step's rows grouped per adapter: consecutive rows as a slice, scattered ones as an index tensor."""
    from selfseek.models.layers import LoRARows
    from selfseek.models.lora_serving import parse_lora_option

    assert LoRARows.from_counts([0, 0], [5, 1]) is None
    rows = LoRARows.from_counts([2, 2, 0, 1, 2], [3, 1, 4, 1, 1])
    assert rows.num_rows == 10
    (a, ra), (b, rb) = rows.groups
    assert (a, b) == (2, 1) and rb == slice(8, 9)
    assert ra.tolist() == [0, 1, 2, 3, 9]
    assert parse_lora_option("sql=/a/b=c") == ("sql", "/a/b=c")
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_lora_option("/just/a/path")
