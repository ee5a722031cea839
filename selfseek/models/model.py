"""Decoder layers stacked into a causal LM; ModelConfig picks the parts.

    h = embed(tokens)
    for each layer: h = h + Attn(RMSNorm(h)); h = h + FFN(RMSNorm(h))
    logits = lm_head(RMSNorm(h))

Attn is MLA for deepseek_v2/v3 and GQA for llama; FFN is a dense SwiGLU for the first
`first_k_dense_replace` layers (and every llama layer), DeepSeekMoE after.
Module names follow the Hugging Face checkpoints, so tensor names map one to one.
"""

from __future__ import annotations

import torch
from torch import nn

from selfseek.config import ModelConfig
from selfseek.models.attention import Attention, KVCache
from selfseek.models.layers import MLP, RMSNorm, causal_mask
from selfseek.models.mla import MLA, AttnMode, LatentCache
from selfseek.models.moe import MoE
from selfseek.models.mtp import MTPLayer


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg) if cfg.is_mla else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos_sin, mask, cache=None, start_pos: int = 0, mode: AttnMode = "auto") -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, mask, cache, start_pos, mode)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        n_mtp = cfg.num_nextn_predict_layers if cfg.model_type == "deepseek_v3" else 0
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.num_hidden_layers + k) for k in range(n_mtp))

    @property
    def rotary(self):
        return self.model.layers[0].self_attn.rotary

    def new_cache(self, batch: int, max_len: int) -> list:
        """Per-layer contiguous caches: the MLA latent (c + r values per token) or K/V per KV head."""
        p = self.lm_head.weight
        kind = LatentCache if self.config.is_mla else KVCache
        return [kind(batch, max_len, self.config, p.dtype, p.device) for _ in self.model.layers]

    def hidden_states(
        self,
        tokens: torch.Tensor,
        start_pos: int = 0,
        cache: list | None = None,
        mode: AttnMode = "auto",
    ) -> torch.Tensor:
        """tokens [b, s] at positions start_pos.. -> last hidden states [b, s, m] before the final norm."""
        b, s = tokens.shape
        positions = torch.arange(start_pos, start_pos + s, device=tokens.device).expand(b, s)
        cos_sin = self.rotary.cos_sin(positions)
        mask = causal_mask(s, start_pos + s, start_pos, tokens.device)
        h = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos_sin, mask, None if cache is None else cache[i], start_pos, mode)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(hidden))

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int = 0,
        cache: list | None = None,
        mode: AttnMode = "auto",
    ) -> torch.Tensor:
        """tokens [b, s] -> logits [b, s, vocab] (in the compute dtype)."""
        return self.logits(self.hidden_states(tokens, start_pos, cache, mode))

    def mtp_logits(self, hidden: torch.Tensor, next_tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Draft logits for t_{i+2} from the main model's hidden h_i and token t_{i+1} (first MTP depth)."""
        if not len(self.mtp):
            raise ValueError("this model has no multi-token-prediction layer")
        b, s = next_tokens.shape
        positions = torch.arange(start_pos, start_pos + s, device=next_tokens.device).expand(b, s)
        mask = causal_mask(s, start_pos + s, start_pos, next_tokens.device)
        x = self.mtp[0](hidden, self.model.embed_tokens(next_tokens), self.rotary.cos_sin(positions), mask)
        return self.lm_head(x)
