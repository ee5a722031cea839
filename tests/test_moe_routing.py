"""models/moe.Gate: the router kernel (kernels/routing.cpp's selfseek_gate: logits, scores, selection) against a plain
float64 evaluation of the same formulas and against the gate's own torch ops (run with the kernels off), for every
topk_method; a token routes the same in any batch at any thread count (what lets the native decode step route in
C and agree with the module path)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from selfseek.config import ModelConfig
from selfseek.kernels import build
from selfseek.models.moe import Gate

needs_kernels = pytest.mark.skipif(build.library("routing") is None, reason="routing kernels unavailable")

V3_GATE = ModelConfig(model_type="deepseek_v3", vocab_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                      hidden_size=64, n_routed_experts=64, num_experts_per_tok=6,
                      n_group=8, topk_group=4, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                      routed_scaling_factor=2.5)
CASES = {
    "v3_noaux_tc": V3_GATE,
    "v3_all_groups": dataclasses.replace(V3_GATE, topk_group=8),
    "v2_group_limited": dataclasses.replace(V3_GATE, n_routed_experts=32, n_group=4, topk_group=2,
                                            topk_method="group_limited_greedy", scoring_func="softmax",
                                            norm_topk_prob=False, routed_scaling_factor=16.0),
    "v2_lite_greedy": dataclasses.replace(V3_GATE, n_routed_experts=16, num_experts_per_tok=4, n_group=1,
                                          topk_group=1, topk_method="greedy", scoring_func="softmax",
                                          norm_topk_prob=False, routed_scaling_factor=1.0),
    "top1_normed": dataclasses.replace(V3_GATE, num_experts_per_tok=1),
}


def _gate(cfg: ModelConfig, seed: int) -> Gate:
    g = torch.Generator().manual_seed(seed)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.3)
        if cfg.topk_method == "noaux_tc":
            gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=g) * 0.1)
    return gate


def _canonical(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (id, weight) pairs ordered by id: torch's unsorted top-k has an order of its own."""
    order = ids.argsort(dim=-1)
    return weights.gather(1, order), ids.gather(1, order)


def _reference(gate: Gate, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing formulas (module docstring of models/moe.py) in float64: (the experts' choice values of each row,
    best first, to check the kernel's order; the weights of the experts ids names)."""
    with torch.no_grad():
        logits = x.double() @ gate.weight.double().T
        scores = logits.sigmoid() if gate.scoring == "sigmoid" else logits.softmax(-1)
        choice = scores + gate.e_score_correction_bias.double() if gate.method == "noaux_tc" else scores
        weights = scores.gather(1, ids)
        if gate.norm_topk_prob and gate.top_k > 1:
            weights = weights / weights.sum(-1, keepdim=True)
        return choice, weights * gate.route_scale


def _chosen(gate: Gate, x: torch.Tensor) -> torch.Tensor:
    """The float64 selection: top_k of the choice among the kept groups."""
    choice, _ = _reference(gate, x, torch.zeros(x.shape[0], 1, dtype=torch.int64))
    if gate.method != "greedy" and gate.topk_group < gate.n_group:
        grouped = choice.view(x.shape[0], gate.n_group, -1)
        group = grouped.topk(2, -1).values.sum(-1) if gate.method == "noaux_tc" else grouped.amax(-1)
        kept = torch.zeros_like(group, dtype=torch.bool).scatter_(1, group.topk(gate.topk_group, -1).indices, True)
        choice = grouped.masked_fill(~kept[..., None], float("-inf")).view(x.shape[0], -1)
    return choice.topk(gate.top_k, -1).indices


@needs_kernels
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_router_kernel_against_float64_and_the_torch_ops(case, rows, kernel_env):
    cfg = CASES[case]
    gate = _gate(cfg, rows)
    x = torch.randn(rows, cfg.hidden_size, generator=torch.Generator().manual_seed(100 + rows))
    with torch.inference_mode():
        w_kernel, ids_kernel = gate(x)
        kernel_env(SELFSEEK_NO_KERNELS="1")
        w_torch, ids_torch = gate(x)
    assert ids_kernel.dtype == torch.int64 and w_kernel.dtype == torch.float32
    assert ids_kernel.shape == ids_torch.shape == (rows, cfg.num_experts_per_tok)
    wk, ik = _canonical(w_kernel, ids_kernel)
    wt, it = _canonical(w_torch, ids_torch)
    assert torch.equal(ik, it) and torch.equal(ik, _chosen(gate, x).sort(-1).values)
    # both fp32 evaluations within a few ulps of float64's: logits of 64 products (|z| ~ 3, each sum its own order),
    # then sigmoid / softmax, the top-k normalization and the scaling, each a rounding or two
    choice, w64 = _reference(gate, x, ik)
    for w in (wk, wt):
        torch.testing.assert_close(w.double(), w64, rtol=2e-6, atol=0)
    # best first: the kernel's order is by the choice the selection used
    picked = choice.gather(1, ids_kernel)
    assert (picked[:, :-1] >= picked[:, 1:]).all()


@needs_kernels
@pytest.mark.parametrize("case", ["v3_noaux_tc", "v2_group_limited"])
def test_a_token_routes_alike_in_any_batch_at_any_thread_count(case):
    """The logits are fixed-order sums per (token, expert): a row's experts and weights are the same bits alone, in a
    batch of 70 (rows taken four at a time, scores and selection in parallel) and at 1 or 2 threads."""
    gate = _gate(CASES[case], 7)
    x = torch.randn(70, CASES[case].hidden_size, generator=torch.Generator().manual_seed(7))
    threads = torch.get_num_threads()
    with torch.inference_mode():
        try:
            torch.set_num_threads(2)
            batch = gate(x)
            torch.set_num_threads(1)
            alone = [gate(x[i:i + 1]) for i in range(70)]
        finally:
            torch.set_num_threads(threads)
    for got, want in zip(batch, (torch.cat([a[j] for a in alone]) for j in range(2)), strict=True):
        assert torch.equal(got, want)


@needs_kernels
def test_routing_kernel_is_skipped_while_the_router_trains():
    gate = _gate(V3_GATE, 0)
    x = torch.randn(3, V3_GATE.hidden_size)
    weights, _ = gate(x)  # grad mode, the router's weight requires grad: the torch ops, so gradients reach it
    # not weights.sum(): normalized top-k weights sum to routed_scaling_factor, a constant whose gradient is zero
    # (rounding alone made it nonzero, or not, by the random x)
    (weights * torch.arange(1.0, weights.shape[1] + 1)).sum().backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
