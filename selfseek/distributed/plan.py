"""The plan on paper: from a model config and a layout, the bytes each rank sends per decoded and per prefill
token, and the memory each rank holds (weights + KV cache at a context).

The traffic model is the collectives the parallel layers make (parallel.py, expert_parallel.py), counted as
comm.py counts them, so a measured run checks it:
- T > 1: one all-reduce of the hidden rows after the embedding, after each attention block and after each
  dense MLP / tensor-parallel MoE block (2 (T-1)/T x rows x m x b each); one all-gather of the logits of the
  sampled rows ((T-1) x ceil(V/T) x b each).
- E > 1 (MoE layers): the counts exchange ((W-1) x 8 bytes), the dispatch of (token, expert) slots routed to
  other ranks (m x b + 8 bytes of expert id each), the combine of the slots other ranks sent here (m x b each);
  with attention replicated or tensor-parallel (D = 1) each rank dispatches its 1/W chunk of the rows and the
  chunks are all-gathered back ((W-1) x ceil(rows/W) x m x b). Routing decides how many slots leave the rank:
  `expected` assumes uniform routing (a slot stays home 1/W of the time), `max` that every slot leaves.
- D > 1 (DP attention, DeepSeek's decode layout, data_parallel.py; the runtime has T = 1): attention local to a
  group of T ranks with its own sequences; MoE EP over the world, each rank dispatching its own rows (no
  all-gather); the fp32 logits of a group's sampled rows gathered to rank 0, which samples (V x 4 bytes each,
  sent by every group but rank 0's: `gather` is what such a rank sends).
The lockstep's command broadcast (the batch's block tables, a few hundred bytes a step) is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from selfseek.config import ModelConfig
from selfseek.distributed.parallel import Layout

GIB = 1 << 30


@dataclass
class Traffic:
    """Bytes one rank sends in one forward, by collective kind (comm.Comm.sent's keys)."""

    all_reduce: float = 0.0
    all_gather: float = 0.0
    all_to_all: float = 0.0  # expected under uniform routing
    all_to_all_max: float = 0.0  # every routed slot sent to another rank
    gather: float = 0.0  # D > 1: the sampled rows' logits a DP rank other than 0 sends to rank 0

    @property
    def total(self) -> float:
        return self.all_reduce + self.all_gather + self.all_to_all + self.gather


def _moe_layers(cfg: ModelConfig, with_mtp: bool = False) -> int:
    n = sum(1 for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    return n + (cfg.num_nextn_predict_layers if with_mtp and cfg.model_type in ("deepseek_v3", "deepseek_v32") else 0)


def traffic(cfg: ModelConfig, layout: Layout, rows: int, sampled: int, act_bytes: int = 4) -> Traffic:
    """Bytes rank 0 sends in a forward of `rows` token rows (in its DP group) of which `sampled` get logits (with
    D > 1 plus `gather`, what the other DP ranks send rank 0 for as many sampled rows)."""
    T, W, m = layout.tp, layout.world, cfg.hidden_size
    t = Traffic()
    layers, moe = cfg.num_hidden_layers, (_moe_layers(cfg) if cfg.n_routed_experts else 0)
    ep = layout.ep > 1 and moe
    if T > 1:
        ring = 2 * (T - 1) / T * rows * m * act_bytes
        blocks = 1 + layers + (layers - moe if ep else layers)  # embedding, attention, MLP/TP-MoE blocks
        t.all_reduce = blocks * ring
        t.all_gather = (T - 1) * sampled * -(-cfg.vocab_size // T) * act_bytes
    if ep:
        k = cfg.num_experts_per_tok
        mine = -(-rows // W) if layout.dp == 1 else rows  # rows this rank dispatches
        slot = m * act_bytes
        per_layer_counts = (W - 1) * 8
        # dispatch (rows + ids) of the slots that leave, then the combine of as many slots coming back
        expected = mine * k * (W - 1) / W * (2 * slot + 8)
        worst = mine * k * (2 * slot + 8)
        t.all_to_all = moe * (per_layer_counts + expected)
        t.all_to_all_max = moe * (per_layer_counts + worst)
        if layout.dp == 1:
            t.all_gather += moe * (W - 1) * mine * slot
    if layout.dp > 1:
        t.gather = sampled * cfg.vocab_size * 4
    return t


def per_token(cfg: ModelConfig, layout: Layout, batch: int = 1, prefill_chunk: int = 4096,
              act_bytes: int = 2) -> dict[str, float]:
    """Bytes per rank per decoded token (a decode step of `batch` sequences, one sampled row each) and per
    prefill token (a `prefill_chunk`-token chunk, one sampled row), expected routing."""
    decode = traffic(cfg, layout, batch, batch, act_bytes)
    prefill = traffic(cfg, layout, prefill_chunk, 1, act_bytes)
    return {"decode": decode.total / batch, "prefill": prefill.total / prefill_chunk}


def weight_params(cfg: ModelConfig, layout: Layout, with_mtp: bool = True) -> dict[str, float]:
    """Parameters rank 0 holds, by part: {"dense": ..., "experts": ...} (experts: routed expert weights)."""
    T, m, V = layout.tp, cfg.hidden_size, cfg.vocab_size
    vocab = -(-V // T) * m * (1 if cfg.tie_word_embeddings else 2)
    if cfg.is_mla:
        h, qk, c, r = cfg.num_attention_heads, cfg.qk_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        q = m * h * qk / T if cfg.q_lora_rank is None else m * cfg.q_lora_rank + cfg.q_lora_rank * (1 + h * qk / T)
        attn = q + m * (c + r) + c + c * h * (cfg.qk_nope_head_dim + cfg.v_head_dim) / T + h * cfg.v_head_dim * m / T
    else:
        d, h, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        attn = (m * (h + 2 * kv) * d + h * d * m) / T
        if cfg.attention_bias or cfg.qkv_bias:
            attn += (h + 2 * kv) * d / T
        if cfg.qk_norm:
            attn += 2 * d
    n_layers = cfg.num_hidden_layers
    n_mtp = cfg.num_nextn_predict_layers if with_mtp and cfg.model_type in ("deepseek_v3", "deepseek_v32") else 0
    moe = _moe_layers(cfg, with_mtp) if cfg.n_routed_experts else 0
    dense_layers = n_layers + n_mtp - moe
    dense = vocab + m + (n_layers + n_mtp) * (attn + 2 * m) + dense_layers * 3 * m * cfg.intermediate_size / T
    dense += n_mtp * (2 * m * m + 3 * m)  # eh_proj, enorm, hnorm, shared_head.norm
    experts = 0.0
    if moe:
        e, i = cfg.n_routed_experts, cfg.moe_intermediate_size
        shared = 3 * m * i * cfg.n_shared_experts
        gate = e * m + (e if cfg.topk_method == "noaux_tc" else 0)
        if layout.ep > 1:
            experts = moe * 3 * m * i * e / layout.ep
            dense += moe * (shared + gate)
        else:
            experts = moe * 3 * m * i * e / T
            dense += moe * (shared / T + gate)
    return {"dense": dense, "experts": experts}


def kv_bytes(cfg: ModelConfig, layout: Layout, context: int, kv_bytes_per_value: int = 2) -> float:
    """KV cache bytes one rank holds for `context` tokens of its sequences (MLA: the latent, the same on every
    rank of a tensor-parallel group; GQA: this rank's KV heads)."""
    if cfg.is_mla:
        per_layer = cfg.kv_values_per_token_per_layer
    else:
        per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim / layout.tp
    return cfg.num_hidden_layers * per_layer * kv_bytes_per_value * context


def memory(cfg: ModelConfig, layout: Layout, context: int, weight_bytes: float = 1.0,
           kv_bytes_per_value: int = 2) -> dict[str, float]:
    """Bytes per rank: weights (at `weight_bytes` a parameter: 1 for FP8, 2 for bf16) and KV at `context`
    tokens (the rank's sequences together)."""
    p = weight_params(cfg, layout)
    w = (p["dense"] + p["experts"]) * weight_bytes
    kv = kv_bytes(cfg, layout, context, kv_bytes_per_value)
    return {"weights": w, "kv": kv, "total": w + kv}
