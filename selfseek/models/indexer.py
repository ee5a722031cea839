"""DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2 paper §1; transformers' DeepseekV32Indexer).

Per layer, a small scorer picks which cached tokens each query attends to:

    q^I = RoPE(wq_b(c^Q))                  [s, H, D]  c^Q: MLA's compressed, normalised query (q_a_layernorm)
    k^I = RoPE(LayerNorm(wk(h)))           [t, D]     one key per token, shared by the H heads (cached)
    w   = weights_proj(h) / sqrt(H)        [s, H]     fp32
    I[s, t] = sum_j w[s, j] * ReLU(q^I[s, j] . k^I[t] / sqrt(D))
    selected(s) = top-index_topk of I[s, :] over the keys s may see (causal)

RoPE here is the half-split layout on the first qk_rope_head_dim values ([rope | pass]), unlike MLA's
interleaved one, with the same frequencies. The released reference also applies a Hadamard rotation and FP8
to q^I and k^I; transformers (our parity reference) skips both (the rotation preserves dot products) and scores
in fp32, as here. A query that sees at most index_topk keys selects them all: attention is then dense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfseek.config import ModelConfig
from selfseek.models.layers import Rotary


class Indexer(nn.Module):
    SCORE_BUDGET = 1 << 24  # per-head index scores held at once (fp32 values: 64 MB)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.rope_dim = cfg.qk_rope_head_dim
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.rotary = Rotary(cfg.rope, self.rope_dim, interleaved=False)
        self.scale = self.head_dim**-0.5

    def keys(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, m] -> the rows' indexer keys [T, D] (what the cache keeps beside the latent)."""
        k = self.k_norm(self.wk(x))
        k_rope, k_pass = k.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([self.rotary(k_rope, *cos_sin), k_pass], dim=-1)

    def queries(
        self, q_compressed: torch.Tensor, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """c^Q [T, q_lora_rank], x [T, m] -> (q^I [T, H, D] fp32, head weights [T, H] fp32)."""
        T = x.shape[0]
        q = self.wq_b(q_compressed).view(T, self.n_heads, self.head_dim)
        q_rope, q_pass = q.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        q = torch.cat([self.rotary(q_rope, *cos_sin), q_pass], dim=-1).float()
        # weights_proj stays fp32 in the reference (transformers keeps it so): score in fp32 whatever the dtype
        w = F.linear(x.float(), self.weights_proj.weight.float()) * self.n_heads**-0.5
        return q, w

    def scores(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """q^I [s, H, D], w [s, H], keys [t, D] -> index scores I [s, t] fp32 (no causal mask)."""
        per_head = F.relu(torch.einsum("shd,td->sht", q, keys.float()) * self.scale)
        return torch.einsum("sh,sht->st", w, per_head)

    def select(
        self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys each of s query rows attends to: -> (key positions [s, k], valid [s, k] bool), k =
        min(index_topk, t). visible [s, t] bool: which keys each row may see; None: causal, the rows being the
        last s of a t-token context (row i sees keys 0 .. t - s + i). A row seeing fewer than k keys has its
        invisible picks marked invalid."""
        s, t = q.shape[0], keys.shape[0]
        if visible is None:
            pos = torch.arange(t, device=keys.device)
            visible = pos[None, :] <= pos[t - s :, None]
        k = min(self.topk, t)
        idx = torch.empty(s, k, dtype=torch.long, device=keys.device)
        valid = torch.empty(s, k, dtype=torch.bool, device=keys.device)
        # the per-head scores are [rows, H, t]: bound them (V3.2: 64 heads x a 128K context is 32 MB per row)
        step = max(1, self.SCORE_BUDGET // (self.n_heads * t))
        for r in range(0, s, step):
            rows = slice(r, min(r + step, s))
            scores = self.scores(q[rows], w[rows], keys).masked_fill(~visible[rows], float("-inf"))
            top = scores.topk(k, dim=-1)
            idx[rows], valid[rows] = top.indices, top.values > float("-inf")
        return idx, valid

    def mask(
        self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """As `select`, as a boolean [s, t] mask (True: attended, `visible` included); None when every row sees at
        most index_topk keys (the visibility mask alone is exact then)."""
        s, t = q.shape[0], keys.shape[0]
        if t <= self.topk:
            return None
        idx, valid = self.select(q, w, keys, visible)
        return torch.zeros(s, t, dtype=torch.bool, device=keys.device).scatter_(1, idx, valid)
