"""Serving across processes (selfseek/distributed): 2 gloo ranks on loopback against one process.

One 2-rank group is started once for the module and reloaded with each checkpoint (spawning costs seconds): the
parallel engine must give the same greedy tokens as one process and logprobs within fp32 tolerance (the ranks sum
partial products in another order), with tensor, expert and data-parallel layouts (DP: each rank its own
requests and KV cache); the bytes the collectives count must match the plan; the server must answer
through the OpenAI client with TP=2 and end cleanly, naming the rank, when a worker is killed mid-request.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selfseek.distributed import comm, plan
from selfseek.distributed.launch import close_parallel, load_parallel, reload_parallel
from selfseek.distributed.parallel import Layout
from selfseek.engine.engine import EngineArgs, LLMEngine
from selfseek.models.quant import QuantStack
from selfseek.sampling_params import SamplingParams
from selfseek.weights import load_model
from tests.checkpoints import add_tokenizer, save_hf_checkpoint
from tests.server_helpers import free_port

PROMPTS = [[3, 17, 42, 99, 7], [5, 6, 7, 8, 9, 10, 11, 12, 13, 300, 301, 302], [3, 17, 42, 99, 7, 250, 251]]
PARAMS = SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True)
LOGPROB_TOL = 1e-4  # fp32: partial sums over ranks change the summation order (measured ~1e-6)


def generate(model, tokenizer) -> dict[str, tuple[list[int], list[dict[int, float]]]]:
    return run_engine(LLMEngine(model, tokenizer, EngineArgs(kv_cache_memory=1 << 22, block_size=4)))


def run_engine(engine: LLMEngine) -> dict[str, tuple[list[int], list[dict[int, float]]]]:
    out: dict[str, tuple[list[int], list]] = {}

    def step() -> None:
        for d in engine.step():
            out[d.request_id][0].extend(d.token_ids)
            out[d.request_id][1].extend(d.logprobs or [])

    for i, p in enumerate(PROMPTS):  # the third shares the first's prefix: a paged (cached-context) chunk
        engine.add_request(f"r{i}", engine.prepare(p, PARAMS), PARAMS)
        out[f"r{i}"] = ([], [])
        step()  # one request at a time enters, so later ones meet cached blocks and running decodes
    while engine.has_work():
        step()
    return out


def assert_same(parallel: dict, single: dict) -> None:
    assert parallel.keys() == single.keys()
    for rid in single:
        assert parallel[rid][0] == single[rid][0], rid
        for got, want in zip(parallel[rid][1], single[rid][1], strict=True):
            assert got.keys() == want.keys()
            for t in want:
                assert abs(got[t] - want[t]) <= LOGPROB_TOL, (rid, t, got[t], want[t])


def test_ep_dispatch_is_differentiable():
    """expert_parallel.dispatch_combine is the one EP implementation training can reuse: on one rank (the same
    sorting, splitting and weighted combine, no transport) it equals the Experts module, and gradients flow."""
    from selfseek.distributed.expert_parallel import dispatch_combine
    from selfseek.models.moe import Experts

    torch.manual_seed(0)
    ex = Experts.__new__(Experts)
    torch.nn.Module.__init__(ex)
    ex.n_experts = 4
    ex.gate_proj, ex.up_proj = (torch.nn.Parameter(torch.randn(4, 8, 8) * 0.3) for _ in range(2))
    ex.down_proj = torch.nn.Parameter(torch.randn(4, 8, 8) * 0.3)
    x = torch.randn(5, 8, requires_grad=True)
    ids = torch.tensor([[0, 3], [1, 2], [2, 3], [0, 1], [3, 0]])
    w = torch.rand(5, 2)
    one = comm.Comm(rank=0, world=1, device=torch.device("cpu"))  # the slot bookkeeping, no transport
    y = dispatch_combine(x, w, ids, ex, one)
    torch.testing.assert_close(y, ex._forward_torch(x, w, ids))
    y.sum().backward()
    assert x.grad is not None and ex.gate_proj.grad is not None


@pytest.fixture(scope="module")
def group():
    """One 2-rank group for the module: {"model": the current LeaderLM}; each test loads its checkpoint on it."""
    state: dict = {"model": None}
    yield state
    if state["model"] is not None:
        close_parallel(state["model"])


def load_on(group: dict, path: Path, layout: Layout, quantize: int | None = None, dtype: str = "float32"):
    if group["model"] is None:
        model, tok = load_parallel(path, dtype, "cpu", False, quantize, tensor_parallel_size=layout.tp,
                                   expert_parallel_size=layout.ep, data_parallel_size=layout.dp)
    else:
        model, tok = reload_parallel(group["model"], path, dtype, quantize, layout)
    group["model"] = model
    return model, tok


CASES = {  # case -> (family, layout, quantize)
    "llama_linear": ("llama_linear", Layout(tp=2), None),  # GQA heads, dense MLP, vocab-parallel embedding, head
    "v2_lite_greedy": ("v2_lite_greedy", Layout(tp=2), None),  # MLA without q_lora (q_proj split), TP MoE
    "v3_noaux": ("v3_noaux", Layout(tp=2, ep=2), None),  # MLA q_b_proj split, experts across ranks, noaux routing
    "v2_group_limited": ("v2_group_limited", Layout(ep=2), 8),  # expert parallel alone, int8 expert stacks
    # a bf16 checkpoint under dtype "auto": bf16 storage, fp32 compute (models/quant.py keep_16bit_storage)
    "llama_bf16_storage": ("llama_linear", Layout(tp=2), None),
}


def weight_bytes(model) -> int:
    return sum(p.nbytes for p in model.parameters())


@pytest.mark.parametrize("case", list(CASES))
def test_parallel_matches_one_process(group, case, tmp_path_factory):
    family, layout, quantize = CASES[case]
    path = tmp_path_factory.mktemp(case)
    bf16 = case.endswith("bf16_storage")
    hf = save_hf_checkpoint(family, path)
    if bf16:
        hf.to(torch.bfloat16).save_pretrained(path)
    dtype = "auto" if bf16 else "float32"
    one, one_tok = load_model(path, dtype, "cpu", False, quantize)
    single = generate(one, one_tok)
    model, tok = load_on(group, path, layout, quantize, dtype)
    if quantize:
        assert isinstance(model.model.layers[1].mlp.experts.gate_proj, QuantStack)
    if bf16:  # every split weight in 16-bit storage on the rank, the vocabulary-parallel rows too: half the bytes
        assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.bfloat16
        assert model.dtype == torch.float32
        assert weight_bytes(model) == pytest.approx(weight_bytes(one) / layout.tp, rel=0.03)
    assert_same(generate(model, tok), single)
    check_plan(model, layout, quantize)


def check_plan(model, layout: Layout, quantize: int | None = None) -> None:
    """The traffic of one forward over 9 rows (all sampled), counted by the collectives, against the plan; the
    weights rank 0 holds against the plan's count."""
    c = comm.current()
    c.reset_counters()
    model(torch.tensor([PROMPTS[1][:9]]))
    want = plan.traffic(model.config, layout, rows=9, sampled=9, act_bytes=4)
    assert c.sent["all_reduce"] == pytest.approx(want.all_reduce)
    assert c.sent["all_gather"] == pytest.approx(want.all_gather)
    assert want.all_to_all_max >= c.sent["all_to_all"] >= (want.all_to_all_max > 0) * 8
    if not quantize:  # the weights this rank holds, against the plan's count (this checkpoint has no MTP layer)
        held = sum(p.numel() for p in model.parameters())
        parts = plan.weight_params(model.config, layout, with_mtp=False)
        assert held == pytest.approx(parts["dense"] + parts["experts"])


DP_CASES = {  # name -> (family, layout)
    "llama_dp2": ("llama_linear", Layout(dp=2)),  # dense: each rank its own batch, no collective in the layers
    "v3_dp2_ep2": ("v3_noaux", Layout(dp=2, ep=2)),  # MLA per rank, each rank's tokens dispatched to the experts
}


@pytest.mark.parametrize("case", list(DP_CASES))
def test_data_parallel_matches_one_process(group, case, tmp_path_factory):
    """Data-parallel attention: each rank runs its own sequences on its own KV cache, MoE layers shared through
    EP; rank 0 places the requests (r0 and r2, which shares r0's cached prefix, on rank 0, r1 on rank 1), so rank
    1 has nothing to do in the first step and the last (it joins the MoE exchanges with no rows)."""
    family, layout = DP_CASES[case]
    path = tmp_path_factory.mktemp(case)
    save_hf_checkpoint(family, path)
    single = generate(*load_model(path, "float32", "cpu", False))
    model, tok = load_on(group, path, layout)
    engine = LLMEngine(model, tok, EngineArgs(kv_cache_memory=1 << 22, block_size=4))
    assert_same(run_engine(engine), single)
    assert engine.scheduler.assigned == [2, 1]
    assert engine.runner.idle_steps >= 2
    assert engine.stats()["prefix_cache_hit_tokens"] == 4  # r2 met r0's first block on rank 0
    check_plan(model, layout)


def test_layout_refuses_tp_inside_dp():
    with pytest.raises(ValueError, match="data_parallel_size 2 with tensor_parallel_size 2"):
        Layout(tp=2, dp=2).check()
    with pytest.raises(ValueError, match="expert_parallel_size 4 must equal"):
        Layout(dp=2, ep=4).check()
    assert Layout(dp=2, ep=2).world == Layout(dp=2).world == 2


# GGUF files, sharded straight from the file's blocks (weights/gguf.py): Q8_0 kept as int8 on every rank. Sizes
# where every row-parallel slice is whole 32-value blocks (the FAMILIES' 160 / 32 intermediates are not at TP=2).
GGUF_CASES = {  # name -> (family, size overrides, layout)
    "llama_q8_0_tp2": ("llama_linear", {"intermediate_size": 128}, Layout(tp=2)),
    "v3_q8_0_tp2": ("v3_noaux", {"intermediate_size": 128, "moe_intermediate_size": 64}, Layout(tp=2)),
    "v3_q8_0_tp2_ep2": ("v3_noaux", {"intermediate_size": 128, "moe_intermediate_size": 64}, Layout(tp=2, ep=2)),
}


def write_tiny_gguf(family: str, path: Path, qtype_name: str = "Q8_0", **sizes) -> Path:
    """A random tiny model of a FAMILIES shape (with `sizes` changed) written as a GGUF by the project's writer."""
    from gguf import GGMLQuantizationType

    from selfseek.config import ModelConfig
    from selfseek.weights.gguf_writer import write_gguf
    from selfseek.weights.safetensors import build_empty
    from tests.checkpoints import FAMILIES, VOCAB

    cls, kwargs = FAMILIES[family]
    model_type = {"LlamaConfig": "llama", "DeepseekV3Config": "deepseek_v3"}[cls]
    cfg = ModelConfig.from_dict({"model_type": model_type, "vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1,
                                 **kwargs, **sizes})
    model = build_empty(cfg, "float32")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            scale, shift = (0.1, 1.0) if name.endswith("norm.weight") else (0.08, 0.0)
            p.copy_(shift + scale * torch.randn(p.shape, generator=gen))
    write_gguf(path, model, GGMLQuantizationType[qtype_name])
    return path


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_parallel_gguf_matches_one_process(group, case, tmp_path_factory):
    family, sizes, layout = GGUF_CASES[case]
    path = write_tiny_gguf(family, tmp_path_factory.mktemp(case) / "model.gguf", **sizes)
    single = generate(*load_model(path, "float32", "cpu", False))
    model, tok = load_on(group, path, layout)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"  # the file's int8 blocks
    assert_same(generate(model, tok), single)


def test_gguf_rank_reads_only_its_slices(tmp_path):
    """Each of 2 TP ranks reads half the bytes of every tensor the layout splits (quantized blocks whole), the
    replicated ones whole, and the two halves are the file's tensor."""
    import numpy as np

    from selfseek.distributed.parallel import Sharding
    from selfseek.weights.gguf import GGUFFile, iter_gguf_tensors, load_gguf

    family, sizes, layout = GGUF_CASES["v3_q8_0_tp2"]
    g = GGUFFile.open(write_tiny_gguf(family, tmp_path / "v3.gguf", **sizes))
    full = {(t.gguf_name, t.param): t for t in iter_gguf_tensors(g)}
    ranks = []
    for r in range(layout.tp):
        shard = Sharding(layout, r)
        model = load_gguf(g, progress=False, shard=shard)
        ranks.append({(t.gguf_name, t.param): t for t in iter_gguf_tensors(g, model.config, shard)})
    split = {k for k in full if ranks[0][k].raw.nbytes != full[k].raw.nbytes}
    assert {k[0] for k in split} >= {"token_embd.weight", "output.weight", "blk.0.ffn_down.weight",
                                     "blk.1.ffn_down_exps.weight", "blk.1.attn_q_b.weight", "blk.1.attn_output.weight"}
    whole = sum(full[k].raw.nbytes for k in split)
    assert whole > 0.8 * sum(t.raw.nbytes for t in full.values())
    for got in ranks:
        assert sum(got[k].raw.nbytes for k in split) == whole // layout.tp
    for k in split:  # the halves, joined along the cut dimension, are the file's bytes
        a, b, want = ranks[0][k].raw, ranks[1][k].raw, full[k].raw
        dim = next(i for i in range(want.ndim) if a.shape[i] != want.shape[i])
        assert np.array_equal(np.concatenate([a, b], axis=dim), want), k


def test_gguf_refuses_a_slice_that_cuts_quantized_blocks(tmp_path):
    from selfseek.distributed.parallel import Sharding
    from selfseek.weights.gguf import load_gguf
    from selfseek.weights.safetensors import CheckpointError

    path = write_tiny_gguf("llama_linear", tmp_path / "llama.gguf")  # intermediate 160: 80 = 2.5 blocks per rank
    with pytest.raises(CheckpointError, match=r"'blk.0.ffn_down.weight' \(Q8_0, shape \[64, 160\]\).*\[0, 80\).*"
                                              r"32-value Q8_0 block"):
        load_gguf(path, progress=False, shard=Sharding(Layout(tp=2), 0))


def _wait_health(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import httpx

    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, "the server exited during start-up"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("the server did not become healthy")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.slow
def test_server_tp2_answers_then_worker_killed(tmp_path):
    """`selfseek serve --tensor-parallel-size 2` answers through the OpenAI client; SIGKILL of rank 1 in the middle
    of a stream ends it with an error and the server exits non-zero within bounded time, naming rank 1."""
    import httpx
    import openai

    ckpt = tmp_path / "ckpt"
    save_hf_checkpoint("llama_linear", ckpt)
    add_tokenizer(ckpt)  # a 512-token vocabulary: start-up indexes it for constrained decoding
    port = free_port()
    env = {**os.environ, "SELFSEEK_DIST_TIMEOUT": "20"}
    proc = subprocess.Popen([sys.executable, "-m", "selfseek.cli", "serve", str(ckpt), "--port", str(port),
                             "--dtype", "float32", "--tensor-parallel-size", "2", "--kv-cache-memory", str(1 << 22),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_health(url, proc)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = client.completions.create(model="ckpt", prompt="The quick brown fox", max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens >= 1

        workers = _children(proc.pid)
        assert len(workers) == 1, workers
        stream = client.completions.create(model="ckpt", prompt="def fibonacci(n):", max_tokens=400,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        t0 = time.time()
        with pytest.raises((openai.APIError, httpx.HTTPError)):
            for i, _ in enumerate(stream):
                if i == 3:
                    os.kill(workers[0], signal.SIGKILL)
        code = proc.wait(timeout=60)
        elapsed = time.time() - t0
        _, err = proc.communicate()
        assert code != 0 and elapsed < 60
        assert "rank 1 exited with code -9" in err, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# Speculative decoding (engine/speculative.py) on a parallel model: the MTP module sharded like a decoder layer
# (its MLA heads split, its MoE tensor- or expert-parallel), drafted through the shared vocabulary-parallel
# embedding and lm_head, every MTP call a lockstep command like the main model's.
SPEC_LAYOUTS = {"tp2": Layout(tp=2), "ep2": Layout(ep=2)}


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory) -> Path:
    from tests.checkpoints import build_hf_model
    from tests.test_speculative import with_mtp

    base = tmp_path_factory.mktemp("v3_mtp")
    build_hf_model("v3_long", seed=0).save_pretrained(base)
    return with_mtp(base, base / "mtp", 0)


@pytest.mark.parametrize("layout", list(SPEC_LAYOUTS))
def test_speculative_decoding_matches_one_process(group, layout, mtp_checkpoint, monkeypatch):
    """Greedy with speculative_tokens=1 on 2 ranks gives the tokens (and logprobs) of one process without
    speculation; the sharded MTP module makes the drafts one process makes. Random MTP weights are rarely right,
    so every other draft is replaced by the true token (test_speculative.oracle) to verify accepted ones too.
    The MTP pass reads each rank's own hidden states of the step (a reference in the command, not the tensor)."""
    from selfseek.distributed.launch import _Ref
    from tests.test_speculative import oracle

    def right(seq, j: int) -> bool:
        return len(seq.output_ids) % 2 == 0

    one, tok = load_model(mtp_checkpoint, "float32", "cpu", False)
    args = {"kv_cache_memory": 1 << 22, "block_size": 4}
    plain = run_engine(LLMEngine(one, tok, EngineArgs(**args)))
    tokens = {rid: t for rid, (t, _) in plain.items()}
    one_spec, one_drafts = LLMEngine(one, tok, EngineArgs(**args, speculative_tokens=1)), []
    oracle(one_spec, tokens, right, one_drafts)
    assert_same(run_engine(one_spec), plain)
    model, tok = load_on(group, mtp_checkpoint, SPEC_LAYOUTS[layout])
    assert len(model.mtp) == 1
    c, commands = model.lockstep.comm, []
    send = c.broadcast_command
    monkeypatch.setattr(c, "broadcast_command", lambda obj: commands.append(obj) or send(obj))
    engine, drafts = LLMEngine(model, tok, EngineArgs(**args, speculative_tokens=1)), []
    oracle(engine, tokens, right, drafts)
    assert_same(run_engine(engine), plain)
    assert drafts == one_drafts and len(drafts) >= 6
    mtp = [a for name, a in commands if name == "mtp_hidden"]
    assert mtp and all(isinstance(a[0], _Ref) and isinstance(a[3], _Ref) for a in mtp)  # hidden, MTP pool
    x = torch.tensor([PROMPTS[1]])  # the cache-free MTP logits (training's evaluation) too
    torch.testing.assert_close(model.mtp_logits(model.hidden_states(x)[:, :-1], x[:, 1:]),
                               one.mtp_logits(one.hidden_states(x)[:, :-1], x[:, 1:]), atol=LOGPROB_TOL, rtol=0)
    got, want = engine.stats(), one_spec.stats()
    assert got["spec_accepted_tokens"] > 0 and got["spec_draft_tokens"] > got["spec_accepted_tokens"]
    for key in ("spec_draft_tokens", "spec_accepted_tokens", "spec_verify_steps"):
        assert got[key] == want[key], key


def test_disk_prefix_cache_on_tensor_parallel(group, tmp_path_factory):
    """The disk tier on TP=2: each rank writes its own heads' KV under DIR/rank<k>/ by the same block keys; after a
    restart (the checkpoint reloaded on the group, a new engine) the same prompts hit the disk and give the same
    tokens; a block one rank lacks is a miss on every rank."""
    path = tmp_path_factory.mktemp("llama_disk")
    save_hf_checkpoint("llama_linear", path)
    cache = tmp_path_factory.mktemp("kv_disk")
    single = generate(*load_model(path, "float32", "cpu", False))
    args = EngineArgs(kv_cache_memory=1 << 22, block_size=4, prefix_cache_dir=str(cache))

    model, tok = load_on(group, path, Layout(tp=2))
    first = LLMEngine(model, tok, args)
    assert_same(run_engine(first), single)
    assert first.stats()["prefix_cache_disk_hit_tokens"] == 0
    model(torch.tensor([PROMPTS[0]]))  # its collectives wait for rank 1: its writes (earlier commands) are done
    files = [{f.name for f in (cache / f"rank{r}").iterdir()} for r in range(2)]
    assert files[0] and files[0] == files[1]  # the same keys, each rank its own shard
    name = next(iter(files[0]))
    assert (cache / "rank0" / name).read_bytes() != (cache / "rank1" / name).read_bytes()  # GQA: other heads

    model, tok = load_on(group, path, Layout(tp=2))  # restart: new pools, an empty RAM cache
    again = LLMEngine(model, tok, args)
    assert_same(run_engine(again), single)
    # full blocks before each prompt's last token: r0 (5 tokens) 1, r1 (12) 2 from disk; r2 meets r0's in RAM
    assert again.stats()["prefix_cache_disk_hit_tokens"] == 4 * (1 + 2)

    model(torch.tensor([PROMPTS[0]]))
    for f in (cache / "rank1").iterdir():  # rank 1 loses its files: no rank may use its own
        f.unlink()
    model, tok = load_on(group, path, Layout(tp=2))
    lost = LLMEngine(model, tok, args)
    assert_same(run_engine(lost), single)
    assert lost.stats()["prefix_cache_disk_hit_tokens"] == 0


def test_data_parallel_refuses_speculation_and_the_disk_tier():
    """TP / EP runs take speculative_tokens and prefix_cache_dir; data-parallel attention (per-rank batches and
    block managers) refuses them before any rank starts."""
    from selfseek.distributed.launch import check_engine_args

    for name, value in (("speculative_tokens", 1), ("prefix_cache_dir", "/tmp/kv")):
        check_engine_args({name: value})
        with pytest.raises(ValueError, match=f"{name}: not supported with data_parallel_size > 1"):
            check_engine_args({name: value}, data_parallel_size=2)
