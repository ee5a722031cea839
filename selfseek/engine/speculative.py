"""Speculative decoding with DeepSeek-V3's multi-token-prediction (MTP) module as the drafter.

Each step, a decoding sequence that has a draft d for the token after its last one is computed with one more
row: [t_last, d] at positions p, p + 1, in the same batched forward as everything else. The engine samples
the token at p + 1 from row p exactly as without speculation; if it equals d, the draft's row already holds
the main model's logits (and KV) for position p + 2, so a second token is sampled from them in the same step.

Sample-then-match is exact for every sampler, not only greedy: the first token is drawn from the main model's
distribution whatever the draft, and the second only after the first is known, from the main model's
distribution given it (the same draws in the same order as without speculation, so seeded requests give the
same tokens). At temperature > 0 it accepts with probability p(d) rather than rejection sampling's
min(1, p(d) / q(d)).

Drafts come from the MTP module after the step: it runs over the same flat batch (same positions, same KV
slots, in its own paged pool indexed by the same block tables), row i taking the main model's h_i and
t_{i+1} (V3 paper §2.2), and the row of the position before a sequence's last token gives the logits of the
token after it. Rows of rejected drafts write main and MTP KV to the slot the next step overwrites.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from selfseek.engine.kv_cache import BlockManager
from selfseek.engine.runner import ModelRunner
from selfseek.engine.sampler import sample
from selfseek.engine.scheduler import Scheduled
from selfseek.engine.sequence import Sequence
from selfseek.models.batch import AttnBatch
from selfseek.models.model import CausalLM

log = logging.getLogger("selfseek.engine")

MAX_SPECULATIVE_TOKENS = 1  # drafts per step; chaining the MTP module on its own output is not built yet


class SpeculativeRunner(ModelRunner):
    """A ModelRunner that verifies MTP drafts in the main forward and drafts the next ones after each step."""

    def __init__(self, model: CausalLM, blocks: BlockManager, num_draft: int, max_model_len: int):
        if not 1 <= num_draft <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_tokens must be between 0 and {MAX_SPECULATIVE_TOKENS}, got {num_draft}")
        if not len(model.mtp):
            raise ValueError("speculative_tokens: this model has no multi-token-prediction layer "
                             "(num_nextn_predict_layers is 0, or the checkpoint was saved without it)")
        super().__init__(model, blocks)
        self.num_draft, self.max_model_len = num_draft, max_model_len
        self.mtp_pool = model.mtp[0].block.self_attn.new_pool(blocks.num_blocks * blocks.block_size, model.dtype,
                                                              model.device)
        self.drafts: dict[Sequence, tuple[int, list[int]]] = {}  # seq -> (its num_tokens when drafted, drafts)
        self.verifying: dict[Sequence, list[int]] = {}  # this step's drafts, as rows after the last token
        self.verify_logits: dict[Sequence, torch.Tensor] = {}  # seq -> [drafts, vocab] main logits of those rows
        self.forwards: list[tuple[list[Sequence], list[int], list[int], AttnBatch, torch.Tensor]] = []
        self.draft_tokens_total = 0
        self.accepted_at = [0] * num_draft  # accepted drafts per draft position
        self.verify_steps = 0  # sequence-steps that verified drafts

    # ---- before the forward ----------------------------------------------------------------------------
    def schedule_drafts(self, scheduled: list[Scheduled]) -> None:
        """Give each decoding sequence with a current draft its draft rows and the KV slots they need."""
        self.verifying.clear()
        self.verify_logits.clear()
        self.forwards.clear()
        for seq in [s for s in self.drafts if s.finished]:
            del self.drafts[seq]
        for s in scheduled:
            seq = s.seq
            made_at, drafts = self.drafts.pop(seq, (-1, []))
            if not drafts or made_at != seq.num_tokens or s.num_new != 1 or not s.samples:
                continue  # stale (new tokens since, preempted, mid-prompt)
            drafts = drafts[: max(0, self.max_model_len - seq.num_tokens)]
            if drafts and self.blocks.can_allocate(seq, 1 + len(drafts)):
                self.blocks.allocate(seq, 1 + len(drafts))
                self.verifying[seq] = drafts

    def draft_tokens(self, s: Scheduled) -> list[int]:
        return self.verifying.get(s.seq, [])

    def after_forward(self, seqs: list[Sequence], starts: list[int], num_rows: list[int], batch: AttnBatch,
                      hidden: torch.Tensor) -> None:
        self.forwards.append((seqs, starts, num_rows, batch, hidden))
        rows, owners, row = [], [], 0
        for seq, n in zip(seqs, num_rows, strict=True):
            row += n
            k = len(self.verifying.get(seq, ()))
            if k:
                rows.extend(range(row - k, row))
                owners.append((seq, k))
        if rows:
            logits = self.model.logits(hidden[torch.tensor(rows, device=hidden.device)]).float()
            for seq, part in zip([s for s, _ in owners], logits.split([k for _, k in owners]), strict=True):
                self.verify_logits[seq] = part

    # ---- after sampling --------------------------------------------------------------------------------
    def accept(self, seq: Sequence, token: int, append: Callable[[Sequence, int, dict | None], None]) -> int:
        """After the engine appended `token`, sampled at the first draft's position: while it equals that
        draft, the draft's row was the right input, so take its cached KV and sample the next token from its
        logits (appended with `append`). -> accepted drafts. Raises what sampling raises (the request fails)."""
        drafts, logits = self.verifying.get(seq), self.verify_logits.get(seq)
        if not drafts or logits is None:
            return 0
        self.verify_steps += 1
        self.draft_tokens_total += len(drafts)
        accepted = 0
        for j, draft in enumerate(drafts):
            if token != draft or seq.finish_reason is not None:
                break
            seq.num_computed += 1  # the draft's KV, written this step, is the accepted token's
            self.accepted_at[j] += 1
            accepted += 1
            tokens, logprobs, failures = sample(logits[j : j + 1], [seq])
            if failures:
                raise failures[0]
            token = tokens[0]
            append(seq, token, logprobs[0])
        if accepted:
            self.blocks.commit_full_blocks(seq)
        return accepted

    def propose(self) -> None:
        """Run the MTP module over this step's forwards; draft the token after each live sequence's last one.
        Drafts only change speed: if the MTP module raises, this step makes none (logged), requests go on."""
        try:
            self._propose()
        except Exception:
            log.exception("the MTP module failed; no drafts this step")
        self.forwards.clear()

    @torch.inference_mode()
    def _propose(self) -> None:
        for seqs, starts, num_rows, batch, hidden in self.forwards:
            next_tokens: list[int] = []
            want, owners, row = [], [], 0
            for seq, start, n in zip(seqs, starts, num_rows, strict=True):
                nxt = seq.token_slice(start + 1, start + n + 1)  # short: rejected draft rows, unsampled
                next_tokens += nxt + [0] * (n - len(nxt))
                last = seq.num_tokens - 2 - start  # row of h_{N-2}, which with t_{N-1} predicts t_N
                if not seq.finished and 0 <= last < min(n, len(nxt)):
                    want.append(row + last)
                    owners.append(seq)
                row += n
            device = hidden.device
            x = self.model.mtp_hidden(hidden, torch.tensor(next_tokens, device=device), batch, self.mtp_pool)
            if want:
                drafts = self.model.lm_head(x[torch.tensor(want, device=device)]).argmax(dim=-1).tolist()
                for seq, d in zip(owners, drafts, strict=True):
                    self.drafts[seq] = (seq.num_tokens, [d])

    def stats(self) -> dict:
        accepted = sum(self.accepted_at)
        return {
            "spec_draft_tokens": self.draft_tokens_total,
            "spec_accepted_tokens": accepted,
            "spec_verify_steps": self.verify_steps,
            "spec_acceptance_rate": accepted / self.draft_tokens_total if self.draft_tokens_total else 0.0,
            "spec_accepted_per_position": list(self.accepted_at),
            "spec_acceptance_rate_per_position": [a / self.verify_steps if self.verify_steps else 0.0
                                                  for a in self.accepted_at],
            # tokens each verifying sequence gained per step: 1 + accepted drafts
            "spec_tokens_per_step": (self.verify_steps + accepted) / self.verify_steps if self.verify_steps else 0.0,
        }
