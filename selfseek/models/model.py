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
from selfseek.kernels.fused_ops import add_rms_norm
from selfseek.models.batch import AttnBatch, build_batch
from selfseek.models.decoder import DecoderLayer
from selfseek.models.layers import RMSNorm, run_linear
from selfseek.models.mtp import MTPLayer
from selfseek.models.native_step import NativeStack

__all__ = ["Backbone", "CausalLM", "DecoderLayer"]


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.v4 is not None:  # its own layers, streams and cache: models/deepseek_v4.py
            raise ValueError("a deepseek_v4 config builds models.deepseek_v4.DeepseekV4LM, not CausalLM")
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        n_mtp = cfg.num_nextn_predict_layers if cfg.model_type in ("deepseek_v3", "deepseek_v32") else 0
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.num_hidden_layers + k) for k in range(n_mtp))

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (quantized layers keep their own storage)."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def rotary(self):
        return self.model.layers[0].self_attn.rotary

    def new_kv_pools(self, num_slots: int, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """One paged cache tensor per layer with `num_slots` token slots (MLA: the latent; V3.2: + indexer key)."""
        return [layer.self_attn.new_pool(num_slots, dtype or self.dtype, self.device) for layer in self.model.layers]

    def hidden_states(
        self,
        tokens: torch.Tensor,
        batch: AttnBatch | None = None,
        pools: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Last hidden states before the final norm.

        tokens [T] with an AttnBatch (the engine's flat batch) -> [T, m];
        or tokens [b, s] without one: each row a whole sequence, no cache -> [b, s, m].
        """
        if batch is None:
            b, s = tokens.shape
            batch = build_batch([(None, 0, s)] * b, tokens.device)
            return self.hidden_states(tokens.reshape(-1), batch).view(b, s, -1)
        cos_sin = self.rotary.cos_sin(batch.positions)
        h = self.embed(tokens)
        if self._fused_residuals():
            native = NativeStack.for_model(self)
            if native is not None and native.takes(h, batch, pools):  # a decode step: the same kernels, no glue
                return native.run(h, cos_sin, batch, pools)
            return self._fused_layers(h, cos_sin, batch, pools)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos_sin, batch, None if pools is None else pools[i])
        return h

    def _fused_residuals(self) -> bool:
        """Whether the stack may run with each residual add fused into the next norm (_fused_layers): not while
        autograd records (the kernel writes the residual in place), and only over plain decoder layers with
        RMSNorms and no hooks on the layers (a hook on a layer would be skipped; hooks on its parts still run)."""
        if torch.is_grad_enabled():
            return False
        layers = self.model.layers
        key = tuple(map(id, layers))
        if self.__dict__.get("_fused_key") != key:  # checked once per change of the stack, not per step
            ok = len(layers) > 0 and all(type(layer) is DecoderLayer and type(layer.input_layernorm) is RMSNorm
                     and type(layer.post_attention_layernorm) is RMSNorm for layer in layers)
            self.__dict__["_fused_key"], self.__dict__["_fused_ok"] = key, ok
        return self.__dict__["_fused_ok"] and not any(layer._forward_hooks or layer._forward_pre_hooks
                                                      for layer in layers)

    def _fused_layers(self, h: torch.Tensor, cos_sin, batch: AttnBatch, pools) -> torch.Tensor:
        """DecoderLayer.forward over the stack, each `h = h + sublayer(...)` fused with the norm after it into
        one kernel call (kernels/fused_ops.py): the same sums and norms, fewer passes and op dispatches."""
        layers = list(self.model.layers)  # a list: ModuleList indexing turns every index into a string key
        norm0 = layers[0].input_layernorm
        x = add_rms_norm(None, h, norm0.weight, norm0.eps)
        residual = None
        for i, layer in enumerate(layers):
            a = layer.self_attn(x, cos_sin, batch, None if pools is None else pools[i])
            if residual is None:  # a new tensor: the embedding's output is never written in place
                residual, a = h + a, None
            post = layer.post_attention_layernorm
            x = add_rms_norm(a, residual, post.weight, post.eps)
            m = layer.mlp(x)
            if i + 1 < len(layers):
                nxt = layers[i + 1].input_layernorm
                x = add_rms_norm(m, residual, nxt.weight, nxt.eps)
            else:
                residual.add_(m)  # the final norm is logits()'s: hidden_states returns the sum before it
        return h if residual is None else residual

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        emb = self.model.embed_tokens
        if isinstance(emb, nn.Embedding):
            return emb(tokens)
        return emb.embed(tokens, self.model.norm.weight.dtype)  # a QuantEmbedding

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.norm(hidden))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """lm_head(x); a float32 head runs in the kernels (layers.run_linear): the output head is the biggest matrix a
        token reads, and torch's sgemv read the medium V3's 529 MB fp32 head in 35 ms on 1 thread and on 2 alike,
        the kernel in 32 / 23 ms (AMD Zen 4)."""
        return run_linear(self.lm_head, x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s], each row a whole sequence -> logits [b, s, vocab] (in the compute dtype)."""
        return self.logits(self.hidden_states(tokens))

    def mtp_hidden(
        self, hidden: torch.Tensor, next_tokens: torch.Tensor, batch: AttnBatch, pool: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The MTP module's normed output [T, m] on a flat batch, from the main model's hidden h_i [T, m] (as
        hidden_states returns it) and tokens t_{i+1} [T]; lm_head of it gives draft logits for t_{i+2}.

        h_i goes through the main model's final norm first: vLLM and SGLang feed DeepSeek's MTP weights the
        main model's normed output. The MTP layer's cache (`pool`) is indexed like the main layers' (row i at
        position i's slot)."""
        if not len(self.mtp):
            raise ValueError("this model has no multi-token-prediction layer")
        cos_sin = self.rotary.cos_sin(batch.positions)
        return self.mtp[0](self.model.norm(hidden), self.embed(next_tokens), cos_sin, batch, pool)

    def draft_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The MTP module's output (as mtp_hidden returns it) -> draft logits (DeepSeek-V4's adds its own head norm)."""
        return self.head(x)

    def mtp_logits(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """Draft logits [b, s, vocab] for t_{i+2} from hidden h_i [b, s, m] (as hidden_states returns it) and
        tokens t_{i+1} [b, s], each row a whole sequence, no cache."""
        b, s = next_tokens.shape
        batch = build_batch([(None, 0, s)] * b, next_tokens.device)
        x = self.mtp_hidden(hidden.reshape(b * s, -1), next_tokens.reshape(-1), batch)
        return self.head(x).view(b, s, -1)
