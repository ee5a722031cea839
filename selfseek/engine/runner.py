"""Builds one step's flat batch from the scheduled sequences, runs the model, returns the logits to sample.

Dense prefills (nothing cached yet) go first, then sequences with cached context (chunks after a cached
prefix, decodes), see models/batch.py; logits are computed only for the rows whose sequence reaches its last
token this step. Block tables live in one persistent tensor (`BlockTables`) updated as sequences gain blocks,
so a step costs Python work per sequence, not per token of context.
"""

from __future__ import annotations

import torch

from selfseek.engine.kv_cache import BlockManager
from selfseek.engine.scheduler import Scheduled
from selfseek.engine.sequence import Sequence
from selfseek.models.batch import AttnBatch, batch_from_tables
from selfseek.models.layers import LoRARows, lora_rows
from selfseek.models.model import CausalLM


def kv_bytes_per_token(model: CausalLM, dtype: torch.dtype | None = None) -> int:
    """Cache bytes one token takes across all layers: layers x (kv_lora_rank + qk_rope_head_dim) x size for MLA."""
    dtype = dtype or model.dtype
    if dtype == torch.float8_e4m3fn:  # fp8 rows: the values, then their fp32 tile scales
        return sum(layer.self_attn.new_pool(1, dtype, "meta").nbytes for layer in model.model.layers)
    size = torch.empty((), dtype=dtype).element_size()
    if hasattr(model, "kv_values_per_token"):  # per-layer pool widths differ (DeepSeek-V4)
        return model.kv_values_per_token() * size
    return model.config.num_hidden_layers * model.config.kv_values_per_token_per_layer * size


class BlockTables:
    """The block tables of live sequences as rows of one int32 tensor [rows, max_blocks] (0-padded).

    A sequence keeps its row while it lives; each step copies only the blocks it gained since the last one.
    Blocks change otherwise only when the sequence is preempted (its blocks freed, later allocated anew): a new
    preemption count, a replaced `block_table` list or a shorter one rewrites the row from the start. Rows of
    finished sequences are released at the next step. Both dims grow by doubling when needed.
    """

    def __init__(self, rows: int = 8, cols: int = 16):
        self.table = torch.zeros(rows, cols, dtype=torch.int32)
        self.free_rows = list(range(rows - 1, -1, -1))
        # seq -> (row, its block list, blocks copied, its preemption count then)
        self.rows: dict[Sequence, tuple[int, list[int], int, int]] = {}

    def sync(self, seqs: list[Sequence]) -> list[int]:
        """Copy the scheduled sequences' new blocks into their rows; -> their row indices."""
        for seq in [s for s in self.rows if s.finished]:
            self.free_rows.append(self.rows.pop(seq)[0])
        out = []
        for seq in seqs:
            blocks = seq.block_table
            row, known, n, preemptions = self.rows.get(seq) or (self._take_row(), None, 0, seq.num_preemptions)
            if known is not blocks or len(blocks) < n or preemptions != seq.num_preemptions:
                n = 0
            if len(blocks) > n:
                self._fit_cols(len(blocks))
                self.table[row, n : len(blocks)] = torch.tensor(blocks[n:], dtype=torch.int32)
            self.rows[seq] = (row, blocks, len(blocks), seq.num_preemptions)
            out.append(row)
        return out

    def _take_row(self) -> int:
        if not self.free_rows:
            n = self.table.shape[0]
            self.table = torch.cat([self.table, torch.zeros_like(self.table)])
            self.free_rows = list(range(2 * n - 1, n - 1, -1))
        return self.free_rows.pop()

    def _fit_cols(self, n: int) -> None:
        cols = self.table.shape[1]
        if n > cols:
            grown = torch.zeros(self.table.shape[0], max(n, 2 * cols), dtype=torch.int32)
            grown[:, :cols] = self.table
            self.table = grown


def _token_slice(seq: Sequence, start: int, n: int) -> list[int]:
    """seq.tokens[start : start + n] without building the whole token list (a decode reads one token)."""
    p = len(seq.prompt_ids)
    if start >= p:
        return seq.output_ids[start - p : start - p + n]
    return seq.prompt_ids[start : start + n] + seq.output_ids[: max(0, start + n - p)]


class ModelRunner:
    def __init__(self, model: CausalLM, blocks: BlockManager, cache_dtype: torch.dtype | None = None):
        self.model, self.blocks = model, blocks
        self.device = model.device
        self.cache_dtype = cache_dtype or model.dtype  # float8_e4m3fn: the fp8 cache (attention_backend)
        self.pools = model.new_kv_pools(blocks.num_blocks * blocks.block_size, self.cache_dtype)
        self.tables = BlockTables()

    @torch.inference_mode()
    def run(self, scheduled: list[Scheduled]) -> tuple[torch.Tensor, list[Scheduled]]:
        """-> (logits [n, vocab] fp32, the n scheduled entries they belong to, in order)."""
        # dense prefills first, then sequences with cached context, longest chunk first (models/batch.py)
        order = sorted(scheduled, key=lambda s: (s.seq.num_computed > 0, -s.num_new))
        tokens: list[int] = []
        starts, num_new = [], []
        for s in order:
            start = s.seq.num_computed
            drafts = self.draft_tokens(s)  # speculative decoding: rows after the last token, to verify
            tokens.extend(_token_slice(s.seq, start, s.num_new) + drafts)
            starts.append(start)
            num_new.append(s.num_new + len(drafts))
        rows = self.tables.sync([s.seq for s in order])
        batch = batch_from_tables(self.tables.table, rows, starts, num_new, self.blocks.block_size, self.device)
        # each sequence's rows under its own LoRA adapter (or none), in this one forward
        lora = LoRARows.from_counts([s.seq.lora_index for s in order], num_new, self.device)
        with lora_rows(lora):
            hidden = self.model.hidden_states(torch.tensor(tokens, device=self.device), batch, self.pools)
        self.after_forward([s.seq for s in order], starts, num_new, batch, hidden)
        ends, sampled, row = [], [], 0
        for s, n in zip(order, num_new, strict=True):
            row += n
            if s.samples:
                ends.append(row - n + s.num_new - 1)
                sampled.append(s)
        if not ends:
            return hidden.new_empty(0, self.model.config.vocab_size), []
        every_row = len(ends) == hidden.shape[0]  # ends ascend: then they are every row, in order (decodes)
        logits = self.model.logits(hidden if every_row else hidden[torch.tensor(ends, device=self.device)])
        return (logits if logits.dtype == torch.float32 else logits.float()), sampled

    def draft_tokens(self, s: Scheduled) -> list[int]:
        """Draft tokens to verify after the scheduled tokens (none here; see engine/speculative.py)."""
        return []

    def after_forward(self, seqs: list[Sequence], starts: list[int], num_rows: list[int], batch: AttnBatch,
                      hidden: torch.Tensor) -> None:
        """Called with each forward's rows and hidden states (engine/speculative.py drafts from them)."""
