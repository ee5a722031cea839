"""Multi-head Latent Attention (DeepSeek-V2 paper §2.1, V3 paper §2.1.1).

Per token: c_KV = RMSNorm(W^DKV h)[:c], k^R = RoPE(W^DKV h)[c:]: the cache holds only these
kv_lora_rank + qk_rope_head_dim values. Two ways to attend over them, equal in exact arithmetic:

- expanded ("MHA mode", prefill): k^C, v = W^UKV c_KV per head, then ordinary attention with
  q = [q^C; q^R], k = [k^C; k^R].
- absorbed ("MQA mode", decode): W^UK folds into the query and W^UV into the output, so scores are
  q^C W^UK . c_KV + q^R . k^R and no per-head K/V is ever built (V2 paper §2.1.3).

The paged cache holds kv_lora_rank + qk_rope_head_dim values per token per layer (576 for V3).
Shape letters: T flat rows, b batch, s queries, t keys, h heads, d nope/v head dim, r rope dim, c latent dim.
"""

from __future__ import annotations

import torch
from torch import nn

from selfseek.config import ModelConfig
from selfseek.models.batch import AttnBatch
from selfseek.models.layers import RMSNorm, Rotary


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.latent_dim = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        hd, qk = cfg.hidden_size, cfg.qk_head_dim
        if cfg.q_lora_rank is None:  # V2-Lite: no query compression
            self.q_proj = nn.Linear(hd, self.n_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(hd, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hd, self.latent_dim + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.latent_dim, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.latent_dim, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, hd, bias=False)
        self.rotary = Rotary(cfg.rope, self.rope_dim, interleaved=cfg.rope_interleave)
        self.scale = cfg.softmax_scale()

    def new_pool(self, num_slots: int, dtype: torch.dtype, device) -> torch.Tensor:
        """The paged cache of one layer: [slots, c + r], the normalised latent then the roped key."""
        return torch.zeros(num_slots, self.latent_dim + self.rope_dim, dtype=dtype, device=device)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        batch: AttnBatch,
        pool: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [T, m] (rows of many sequences, see models/batch.py) -> [T, m]."""
        T = x.shape[0]
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(T, self.n_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = self.rotary(q_rope, *cos_sin)

        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.latent_dim, self.rope_dim], dim=-1)
        kv = torch.cat([self.kv_a_layernorm(latent), self.rotary(k_rope, *cos_sin)], dim=-1)  # [T, c + r]
        if pool is not None and batch.slot_mapping is not None:
            pool[batch.slot_mapping] = kv

        out = x.new_empty(T, self.n_heads, self.v_dim)
        for seg in batch.prefills:
            rows = slice(seg.q_start, seg.q_end)
            ctx = kv[rows] if seg.prefix_slots is None else torch.cat([pool[seg.prefix_slots], kv[rows]])
            mask = None if seg.mask is None else seg.mask[None]
            out[rows] = self._attend(batch.prefill_mode, q_nope[rows][None], q_rope[rows][None], ctx[None], mask)[0]
        d = batch.decode_start
        if d < T:
            ctx = pool[batch.decode_slots]  # [B, T_max, c + r]: the whole context, this token included
            out[d:] = self._attend(batch.decode_mode, q_nope[d:, None], q_rope[d:, None], ctx, batch.decode_mask)[:, 0]
        return self.o_proj(out.flatten(1))

    def _attend(self, mode: str, q_nope, q_rope, ctx, mask) -> torch.Tensor:
        """q_nope [b, s, h, d], q_rope [b, s, h, r], ctx [b, t, c + r], mask [b, s, t] -> [b, s, h, v]."""
        latent, k_rope = ctx.split([self.latent_dim, self.rope_dim], dim=-1)
        if mode == "expanded":
            return self._attend_expanded(q_nope, q_rope, latent, k_rope, mask)
        return self._attend_absorbed(q_nope, q_rope, latent, k_rope, mask)

    def _softmax(self, scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        dtype = scores.dtype
        scores = scores * self.scale
        if mask is not None:
            scores = scores + mask[:, :, None, :]  # [b, s, t] -> [b, s, h, t]
        return scores.softmax(dim=-1, dtype=torch.float32).to(dtype)

    def _attend_expanded(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        b, t, _ = latent.shape
        kv = self.kv_b_proj(latent).view(b, t, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        scores = torch.einsum("bshd,bthd->bsht", q_nope, k_nope) + torch.einsum("bshr,btr->bsht", q_rope, k_rope)
        p = self._softmax(scores, mask)
        return torch.einsum("bsht,bthd->bshd", p, v)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W^UK [h, d, c] and W^UV [h, v, c] split out of kv_b_proj, contiguous, made once per weight version."""
        w = self.kv_b_proj.weight
        key = (w.data_ptr(), w._version)
        if getattr(self, "_absorbed_key", None) != key:
            w = w.detach().view(self.n_heads, self.nope_dim + self.v_dim, self.latent_dim)
            self._absorbed = (w[:, : self.nope_dim].contiguous(), w[:, self.nope_dim :].contiguous())
            self._absorbed_key = key
        return self._absorbed

    def _attend_absorbed(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        w_uk, w_uv = self.absorbed_weights()
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # W^UK absorbed into the query
        scores = torch.einsum("bshc,btc->bsht", q_latent, latent) + torch.einsum("bshr,btr->bsht", q_rope, k_rope)
        p = self._softmax(scores, mask)
        o_latent = torch.einsum("bsht,btc->bshc", p, latent)
        return torch.einsum("bshc,hdc->bshd", o_latent, w_uv)  # W^UV absorbed after attention
