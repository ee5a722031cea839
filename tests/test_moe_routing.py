"""models/moe.Gate: the routing kernel (kernels/routing.cpp) against the gate's own torch ops (the reference kept in
the module, run with the kernels off), for every topk_method, and the decode step it serves."""

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


@needs_kernels
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_routing_kernel_picks_the_torch_experts_with_the_torch_weights(case, rows, kernel_env):
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
    assert torch.equal(ik, it)
    # the same scores picked and scaled alike; only the normalizing sum of top_k terms adds in another order: a few
    # fp32 roundings (<= top_k half-ulps in the sum, one each in the division and the scaling)
    torch.testing.assert_close(wk, wt, rtol=cfg.num_experts_per_tok * 1.2e-7, atol=0)
    if not cfg.norm_topk_prob or cfg.num_experts_per_tok == 1:
        assert torch.equal(wk, wt)  # nothing summed: the very same bits
    # best first: the kernel's order is by the unbiased-or-biased choice the selection used
    with torch.no_grad():
        logits = x @ gate.weight.T
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
        choice = scores + gate.e_score_correction_bias if cfg.topk_method == "noaux_tc" else scores
        picked = choice.gather(1, ids_kernel.clone())
    assert (picked[:, :-1] >= picked[:, 1:]).all()


@needs_kernels
def test_routing_kernel_is_skipped_while_the_router_trains():
    gate = _gate(V3_GATE, 0)
    x = torch.randn(3, V3_GATE.hidden_size)
    weights, _ = gate(x)  # grad mode, the router's weight requires grad: the torch ops, so gradients reach it
    # not weights.sum(): normalized top-k weights sum to routed_scaling_factor, a constant whose gradient is zero
    # (rounding alone made it nonzero, or not, by the random x)
    (weights * torch.arange(1.0, weights.shape[1] + 1)).sum().backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
