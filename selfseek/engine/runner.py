"""Builds one step's flat batch from the scheduled sequences, runs the model, returns the logits to sample.

Prefill segments go first and decodes last (models/batch.py); logits are computed only for the rows
whose sequence reaches its last token this step.
"""

from __future__ import annotations

import torch

from selfseek.engine.kv_cache import BlockManager
from selfseek.engine.scheduler import Scheduled
from selfseek.models.batch import build_batch
from selfseek.models.model import CausalLM


def kv_bytes_per_token(model: CausalLM, dtype: torch.dtype | None = None) -> int:
    """Cache bytes one token takes across all layers: layers x (kv_lora_rank + qk_rope_head_dim) x size for MLA."""
    dtype = dtype or model.dtype
    size = torch.empty((), dtype=dtype).element_size()
    return model.config.num_hidden_layers * model.config.kv_values_per_token_per_layer * size


class ModelRunner:
    def __init__(self, model: CausalLM, blocks: BlockManager):
        self.model, self.blocks = model, blocks
        self.device = model.device
        self.pools = model.new_kv_pools(blocks.num_blocks * blocks.block_size)

    @torch.inference_mode()
    def run(self, scheduled: list[Scheduled]) -> tuple[torch.Tensor, list[Scheduled]]:
        """-> (logits [n, vocab] fp32, the n scheduled entries they belong to, in order)."""
        is_decode = [s.num_new == 1 and s.seq.num_computed > 0 for s in scheduled]
        order = [s for s, d in zip(scheduled, is_decode, strict=True) if not d]
        order += [s for s, d in zip(scheduled, is_decode, strict=True) if d]
        tokens, items = [], []
        for s in order:
            seq, start = s.seq, s.seq.num_computed
            tokens.extend(seq.tokens[start : start + s.num_new])
            items.append((self.blocks.slots(seq, start + s.num_new), start, s.num_new))
        batch = build_batch(items, self.device)
        hidden = self.model.hidden_states(torch.tensor(tokens, device=self.device), batch, self.pools)
        ends, sampled, row = [], [], 0
        for s in order:
            row += s.num_new
            if s.samples:
                ends.append(row - 1)
                sampled.append(s)
        if not ends:
            return hidden.new_empty(0, self.model.config.vocab_size), []
        logits = self.model.logits(hidden[torch.tensor(ends, device=self.device)])
        return logits.float(), sampled
