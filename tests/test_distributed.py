"""Serving across processes (selfseek/distributed): 2 gloo ranks on loopback against one process.

One 2-rank group is started once for the module and reloaded with each checkpoint (spawning costs seconds): the
parallel engine must give the same greedy tokens as one process and logprobs within fp32 tolerance (the ranks sum
partial products in another order); the bytes the collectives count must match the plan; the server must answer
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
    engine = LLMEngine(model, tokenizer, EngineArgs(kv_cache_memory=1 << 22, block_size=4))
    out: dict[str, tuple[list[int], list]] = {}
    for i, p in enumerate(PROMPTS):  # the third shares the first's prefix: a paged (cached-context) chunk
        engine.add_request(f"r{i}", engine.prepare(p, PARAMS), PARAMS)
        out[f"r{i}"] = ([], [])
        engine.step()  # one request at a time enters, so later ones meet cached blocks and running decodes
    while engine.has_work():
        for d in engine.step():
            out[d.request_id][0].extend(d.token_ids)
            out[d.request_id][1].extend(d.logprobs or [])
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


def load_on(group: dict, path: Path, layout: Layout, quantize: int | None = None):
    if group["model"] is None:
        model, tok = load_parallel(path, "float32", "cpu", False, quantize, tensor_parallel_size=layout.tp,
                                   expert_parallel_size=layout.ep)
    else:
        model, tok = reload_parallel(group["model"], path, "float32", quantize, layout)
    group["model"] = model
    return model, tok


CASES = {  # family -> (layout, quantize)
    "llama_linear": (Layout(tp=2), None),  # GQA heads, dense MLP, vocab-parallel embedding and head
    "v2_lite_greedy": (Layout(tp=2), None),  # MLA without q_lora (q_proj split), tensor-parallel MoE
    "v3_noaux": (Layout(tp=2, ep=2), None),  # MLA q_b_proj split, experts across ranks, aux-loss-free routing
    "v2_group_limited": (Layout(ep=2), 8),  # expert parallel alone, int8 expert stacks
}


@pytest.mark.parametrize("family", list(CASES))
def test_parallel_matches_one_process(group, family, tmp_path_factory):
    layout, quantize = CASES[family]
    path = tmp_path_factory.mktemp(family)
    save_hf_checkpoint(family, path)
    single = generate(*load_model(path, "float32", "cpu", False, quantize))
    model, tok = load_on(group, path, layout, quantize)
    if quantize:
        assert isinstance(model.model.layers[1].mlp.experts.gate_proj, QuantStack)
    assert_same(generate(model, tok), single)

    # the traffic of one forward over 9 rows (all sampled), counted by the collectives, against the plan
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
