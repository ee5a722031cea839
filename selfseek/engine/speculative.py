"""Speculative decoding with DeepSeek-V3's multi-token-prediction (MTP) module as the drafter.

Drafting (V3 paper §2.2, chained as DeepSeek's serving does for k > 1): after each step the MTP module runs
over the step's flat batch (same positions, same KV slots, in its own paged pool indexed by the same block
tables), row i taking the main model's h_i and t_{i+1}; the row of the position before a sequence's last token
gives draft d_1 of the token after it. Before the next forward, drafts d_2..d_k come from running the module
on its own output: row N-2+j takes the module's output of the previous row and d_j. Those chain rows write MTP
KV to slots that the next step's MTP pass overwrites with the true values.

Verification: a decoding sequence with drafts d_1..d_k is computed with k more rows [t_last, d_1..d_k] in the
same batched forward as everything else; row j's logits are the main model's distribution p_j of the token
after d_j (p_0: after t_last). Two exact rules decide what is kept:
- sample-then-match, for greedy rows (exact equality with plain decoding) and for seeded, penalized, biased or
  constrained rows: the token at each row is sampled as without speculation, and the next row is used only
  if that token equals the draft. The same draws in the same order, so a seeded request gives the same tokens.
- rejection sampling (Leviathan et al. 2023; Chen et al. 2023) for the other temperature > 0 rows: d_j is
  drawn from the draft distribution q_j (the MTP logits under the request's temperature / top-k / top-p /
  min-p), accepted with probability min(1, p_j(d_j) / q_j(d_j)); the first rejection resamples from
  norm(max(0, p_j - q_j)), and when all k are accepted one more token comes from p_k. Every emitted token is
  distributed exactly as the main model's (`speculative_sample`), with a higher acceptance than matching.

Rows of rejected drafts wrote main and MTP KV to slots the next step overwrites; blocks that only they reached
are freed after verification (BlockManager.trim).

The runner reaches the MTP module only through model-level calls (new_mtp_pool, mtp_hidden, mtp_chain,
draft_logits), so a parallel model (distributed/launch.py) runs each on every rank's shard in lockstep.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from selfseek.engine.kv_cache import BlockManager
from selfseek.engine.runner import ModelRunner
from selfseek.engine.sampler import _filters, filtered_probs, sample, top_logprobs
from selfseek.engine.scheduler import Scheduled
from selfseek.engine.sequence import Sequence
from selfseek.kernels import fused_ops
from selfseek.models.batch import AttnBatch, batch_from_tables
from selfseek.models.model import CausalLM
from selfseek.sampling_params import SamplingParams

log = logging.getLogger("selfseek.engine")

MAX_SPECULATIVE_TOKENS = 3  # drafts per step (the MTP module chained on its own output past the first)


def target_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [R, vocab] -> [R, vocab] fp32: the distribution the sampler draws row r from under params[r]
    (temperature, then top-k / top-p / min-p exactly as sampler.filtered_probs defines them). Not for greedy
    rows, nor for penalties, bias or processors (sample-then-match handles those)."""
    vocab = logits.shape[-1]
    temp = torch.tensor([p.temperature for p in params], device=logits.device, dtype=torch.float32)[:, None]
    scaled = logits.float() / temp
    out = scaled.softmax(dim=-1)
    rest = [r for r, p in enumerate(params) if _filters(p, vocab)]
    if rest:
        probs, ids = filtered_probs(scaled[rest], [params[r] for r in rest])
        # scatter_add: filtered_probs pads rows with (id 0, prob 0) columns, which must not overwrite token 0
        out[rest] = torch.zeros(len(rest), vocab, device=out.device).scatter_add_(1, ids, probs.float())
    return out


def speculative_sample(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The accept / resample rule of speculative sampling, for B sequences at once.

    p [B, k+1, V]: the target distributions after each of the k+1 verified rows; q [B, k, V]: the draft
    distributions the drafts [B, k] were drawn from. -> (tokens [B, k+1], accepted [B]): row b emits
    tokens[b, : accepted[b] + 1], the accepted drafts then one token from the residual norm(max(0, p - q)) at
    the first rejection, or from p[b, k] when all were accepted. Each emitted token is distributed exactly as
    p given the ones before it."""
    B, k = drafts.shape
    rows = torch.arange(B, device=p.device)
    pd = p[:, :k].gather(2, drafts[..., None]).squeeze(-1)
    qd = q.gather(2, drafts[..., None]).squeeze(-1)
    u = torch.rand(B, k, generator=generator, dtype=p.dtype, device=p.device)
    accepted = (u * qd < pd).int().cumprod(dim=1).sum(dim=1)  # u < p/q without dividing; p(d) = 0 never passes
    p_at = p[rows, accepted]
    q_at = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)[rows, accepted]  # all accepted: q = 0, so p itself
    residual = (p_at - q_at).clamp_min(0)
    # a rejection implies p(d) < q(d), so some token has p > q; rounding alone could leave no mass: fall back to p
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_at)
    last = torch.multinomial(residual, 1, generator=generator).squeeze(1)
    tokens = torch.cat([drafts, torch.zeros_like(drafts[:, :1])], dim=1)
    tokens[rows, accepted] = last
    return tokens, accepted


def new_mtp_pool(model: CausalLM, num_slots: int, dtype: torch.dtype) -> torch.Tensor:
    """The MTP layer's paged KV pool, indexed by the same block tables as the main layers' pools."""
    return model.mtp[0].block.self_attn.new_pool(num_slots, dtype, model.device)


def mtp_chain(model: CausalLM, hidden: torch.Tensor, tokens: torch.Tensor, batch: AttnBatch,
              pool: torch.Tensor) -> torch.Tensor:
    """One chained drafting row per sequence: the MTP module on its own previous output `hidden` [R, m] and the
    draft `tokens` [R] -> its normed output [R, m] (draft_logits of it gives the next draft)."""
    return model.mtp[0](hidden, model.embed(tokens), model.rotary.cos_sin(batch.positions), batch, pool)


MTP_CALLS = {"new_mtp_pool": new_mtp_pool, "mtp_chain": mtp_chain}


def _mtp_call(model: CausalLM, name: str, *args):
    """MTP_CALLS[name](model, *args), or the model's own method of that name: a parallel model
    (distributed/launch.py LeaderLM) runs it on every rank's shard at once."""
    method = getattr(model, name, None)
    return method(*args) if method is not None else MTP_CALLS[name](model, *args)


def rejection_sampled(seq: Sequence) -> bool:
    """Whether a sequence's drafts are drawn from q and verified by rejection sampling (else: argmax drafts,
    sample-then-match). Seeded rows keep matching so their tokens do not depend on speculation."""
    p = seq.params
    return not p.greedy and seq.generator is None and not p.has_penalties and not seq.processors


@dataclass
class _Draft:
    made_at: int  # the sequence's num_tokens when d_1 was drafted (stale once it has more)
    tokens: list[int]
    q: list[torch.Tensor] | None  # each draft's distribution [vocab] (rejection-sampled sequences), else None
    hidden: torch.Tensor  # [m] the MTP module's output at the last draft's row: the next chain step's input


class SpeculativeRunner(ModelRunner):
    """A ModelRunner that verifies MTP drafts in the main forward and drafts the next ones after each step."""

    def __init__(self, model: CausalLM, blocks: BlockManager, num_draft: int, max_model_len: int,
                 cache_dtype: torch.dtype | None = None):
        if not 1 <= num_draft <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_tokens must be between 0 and {MAX_SPECULATIVE_TOKENS}, got {num_draft}")
        if not len(model.mtp):
            raise ValueError("speculative_tokens: this model has no multi-token-prediction layer "
                             "(num_nextn_predict_layers is 0, or the checkpoint was saved without it)")
        super().__init__(model, blocks, cache_dtype)
        self.num_draft, self.max_model_len = num_draft, max_model_len
        self.mtp_pool = _mtp_call(model, "new_mtp_pool", blocks.num_blocks * blocks.block_size, self.cache_dtype)
        self.drafts: dict[Sequence, _Draft] = {}
        self.verifying: dict[Sequence, _Draft] = {}  # this step's drafts (cut to the rows given), after the last token
        self.verify_logits: dict[Sequence, torch.Tensor] = {}  # seq -> [drafts, vocab] main logits of those rows
        self.want: dict[Sequence, int] = {}  # drafts each verifying sequence has rows for this step
        self.forwards: list[tuple[list[Sequence], list[int], list[int], AttnBatch, torch.Tensor]] = []
        self.draft_tokens_total = 0
        self.drafted_at = [0] * num_draft  # drafts verified per draft position
        self.accepted_at = [0] * num_draft  # accepted drafts per draft position
        self.verify_steps = 0  # sequence-steps that verified drafts

    # ---- before the forward ----------------------------------------------------------------------------
    def schedule_drafts(self, scheduled: list[Scheduled]) -> None:
        """Give each decoding sequence with a current draft its draft rows and the KV slots they need (fewer
        drafts when blocks are short), then chain the MTP module to draft the rest."""
        self.verifying.clear()
        self.verify_logits.clear()
        self.forwards.clear()
        for seq in [s for s in self.drafts if s.finished]:
            del self.drafts[seq]
        for s in scheduled:
            seq = s.seq
            draft = self.drafts.pop(seq, None)
            if draft is None or draft.made_at != seq.num_tokens or s.num_new != 1 or not s.samples:
                continue  # stale (new tokens since, preempted, mid-prompt)
            k = min(self.num_draft, self.max_model_len - seq.num_tokens)
            while k and not self.blocks.can_allocate(seq, 1 + k):
                k -= 1
            if k:
                self.blocks.allocate(seq, 1 + k)
                self.verifying[seq] = draft
                self.want[seq] = k
        try:
            self._chain()
        except Exception:  # drafts only change speed: verify what was drafted so far
            log.exception("the MTP module failed while chaining drafts")
        for seq, draft in self.verifying.items():
            k = min(self.want[seq], len(draft.tokens))
            draft.tokens = draft.tokens[:k]
            draft.q = None if draft.q is None else draft.q[:k]
        self.want.clear()

    @torch.inference_mode()
    def _chain(self) -> None:
        """Drafts d_2..d_k: row N-2+j of the MTP module on its own output of row N-3+j and d_j, one batched
        single-row-per-sequence pass per draft position."""
        for j in range(1, self.num_draft):
            group = [seq for seq, d in self.verifying.items() if self.want[seq] > j and len(d.tokens) == j]
            if not group:
                return
            drafts = [self.verifying[seq] for seq in group]
            rows = self.tables.sync(group)
            batch = batch_from_tables(self.tables.table, rows, [seq.num_tokens - 2 + j for seq in group],
                                      [1] * len(group), self.blocks.block_size, self.device)
            tokens = torch.tensor([d.tokens[-1] for d in drafts], device=self.device)
            x = _mtp_call(self.model, "mtp_chain", torch.stack([d.hidden for d in drafts]), tokens, batch,
                          self.mtp_pool)
            new, qs = self._draw(self.model.draft_logits(x).float(), group)
            for i, d in enumerate(drafts):
                d.tokens.append(new[i])
                if d.q is not None:
                    d.q.append(qs[i])
                d.hidden = x[i]

    @staticmethod
    def _draw(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[torch.Tensor | None]]:
        """Draft tokens from MTP logits [R, vocab]: drawn from q for rejection-sampled sequences (-> q rows),
        the argmax for the others (-> None)."""
        tokens = fused_ops.argmax_rows(logits)  # as the sampler: the first maximum
        qs: list[torch.Tensor | None] = [None] * len(seqs)
        rs = [i for i, seq in enumerate(seqs) if rejection_sampled(seq)]
        if rs:
            q = target_probs(logits[rs], [seqs[i].params for i in rs])
            for i, t, qi in zip(rs, torch.multinomial(q, 1).squeeze(1).tolist(), q, strict=True):
                tokens[i], qs[i] = t, qi
        return tokens, qs

    def draft_tokens(self, s: Scheduled) -> list[int]:
        d = self.verifying.get(s.seq)
        return d.tokens if d is not None else []

    def after_forward(self, seqs: list[Sequence], starts: list[int], num_rows: list[int], batch: AttnBatch,
                      hidden: torch.Tensor) -> None:
        self.forwards.append((seqs, starts, num_rows, batch, hidden))
        rows, owners, row = [], [], 0
        for seq, n in zip(seqs, num_rows, strict=True):
            row += n
            draft = self.verifying.get(seq)
            k = len(draft.tokens) if draft is not None else 0
            if k:
                rows.extend(range(row - k, row))
                owners.append((seq, k))
        if rows:
            logits = self.model.logits(hidden[torch.tensor(rows, device=hidden.device)]).float()
            for seq, part in zip([s for s, _ in owners], logits.split([k for _, k in owners]), strict=True):
                self.verify_logits[seq] = part

    # ---- after sampling --------------------------------------------------------------------------------
    def accept(self, seq: Sequence, token: int, logprobs: dict | None, logits: torch.Tensor,
               append: Callable[[Sequence, int, dict | None], None]) -> int:
        """Emit the sequence's tokens of this step with `append`: `token` (sampled by the engine from
        `logits`, the row of its last token) and what its drafts add. -> accepted drafts. Raises what sampling
        raises (the request fails)."""
        draft, verify = self.verifying.get(seq), self.verify_logits.get(seq)
        if draft is None or verify is None:
            append(seq, token, logprobs)
            return 0
        if draft.q is None:
            append(seq, token, logprobs)
            if seq.finish_reason is not None:
                return 0
            accepted = self._match(seq, token, draft.tokens, verify, append)
        else:
            accepted = self._reject(seq, logits, draft, verify, append)
        self.verify_steps += 1
        self.draft_tokens_total += len(draft.tokens)
        for j in range(len(draft.tokens)):
            self.drafted_at[j] += 1
        if accepted:
            self.blocks.commit_full_blocks(seq)
        if not seq.finished:
            self.blocks.trim(seq, seq.num_tokens)  # the blocks that only rejected drafts' rows reached
        return accepted

    def _match(self, seq: Sequence, token: int, drafts: list[int], verify: torch.Tensor,
               append: Callable[[Sequence, int, dict | None], None]) -> int:
        """Sample-then-match: while the token just sampled equals the next draft, that draft's row was the right
        input, so take its KV and sample the next token from its logits."""
        accepted = 0
        for j, d in enumerate(drafts):
            if token != d or seq.finish_reason is not None:
                break
            seq.num_computed += 1  # the draft's KV, written this step, is the accepted token's
            self.accepted_at[j] += 1
            accepted += 1
            tokens, logprobs, failures = sample(verify[j : j + 1], [seq])
            if failures:
                raise failures[0]
            token = tokens[0]
            append(seq, token, logprobs[0])
        return accepted

    def _reject(self, seq: Sequence, logits: torch.Tensor, draft: _Draft, verify: torch.Tensor,
                append: Callable[[Sequence, int, dict | None], None]) -> int:
        """Rejection sampling of the drafts against the main model's rows (the engine's own draw from the
        first row is not used: an unseeded draw, so dropping it changes no distribution)."""
        rows = torch.cat([logits.float()[None].to(verify.device), verify])  # [k+1, vocab]
        params = seq.params
        p = target_probs(rows, [params] * rows.shape[0])
        tokens, accepted = speculative_sample(p[None], torch.stack(draft.q)[None],
                                              torch.tensor([draft.tokens], device=p.device))
        n = int(accepted[0])
        lps = rows.log_softmax(dim=-1) if params.logprobs is not None else None
        emitted = 0
        for j, t in enumerate(tokens[0, : n + 1].tolist()):
            if j:  # token j comes from draft j's row: draft j was accepted, its KV is the token's
                seq.num_computed += 1
                self.accepted_at[j - 1] += 1
                emitted += 1
            append(seq, t, None if lps is None else top_logprobs(lps[j], t, params.logprobs))
            if seq.finish_reason is not None:
                break
        return emitted

    def propose(self) -> None:
        """Run the MTP module over this step's forwards; draft the token after each live sequence's last one.
        Drafts only change speed: if the MTP module raises, this step makes none (logged), requests go on."""
        try:
            self._propose()
        except Exception:
            log.exception("the MTP module failed; no drafts this step")
        finally:
            if self.blocks.disk is not None:  # this step's committed blocks, their MTP KV now written
                self.blocks.disk.flush()
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
                x = x[torch.tensor(want, device=device)]
                tokens, qs = self._draw(self.model.draft_logits(x).float(), owners)
                for i, seq in enumerate(owners):
                    self.drafts[seq] = _Draft(seq.num_tokens, [tokens[i]], None if qs[i] is None else [qs[i]], x[i])

    def stats(self) -> dict:
        accepted = sum(self.accepted_at)
        return {
            "spec_draft_tokens": self.draft_tokens_total,
            "spec_accepted_tokens": accepted,
            "spec_verify_steps": self.verify_steps,
            "spec_acceptance_rate": accepted / self.draft_tokens_total if self.draft_tokens_total else 0.0,
            "spec_accepted_per_position": list(self.accepted_at),
            "spec_acceptance_rate_per_position": [a / d if d else 0.0
                                                  for a, d in zip(self.accepted_at, self.drafted_at, strict=True)],
            # tokens each verifying sequence gained per step: 1 + accepted drafts
            "spec_tokens_per_step": (self.verify_steps + accepted) / self.verify_steps if self.verify_steps else 0.0,
        }
