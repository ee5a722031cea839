"""Next-token and multi-token-prediction losses (V3 paper §2.2), as sums over tokens.

With inputs t_1..t_T and targets t_2..t_{T+1}, the main model predicts t_{i+1} from h_i; the depth-1 MTP
module combines h_i (before the final norm) with Emb(t_{i+1}) and predicts t_{i+2}:
    L_main = CE(logits_i, t_{i+1}),   L_MTP = CE(mtp_logits(h_i, t_{i+1}), t_{i+2})   for i = 1..T-1.
Sums, not means: the caller divides by the token counts of the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfseek.models.batch import build_batch
from selfseek.models.model import CausalLM
from selfseek.train.data import IGNORE


@dataclass
class LossSums:
    lm: torch.Tensor  # summed CE over target tokens
    mtp: torch.Tensor | None  # summed MTP CE, None without MTP


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def lm_losses(
    model: CausalLM, inputs: torch.Tensor, targets: torch.Tensor, mtp: bool, doc_lens: list[int] | None = None
) -> LossSums:
    """doc_lens: inputs [1, T] is packed (data.collate with pack): documents of these lengths, each attending only
    to itself with positions from 0 (one dense prefill segment each)."""
    if doc_lens is not None:
        if mtp:
            raise ValueError("the MTP loss is not computed over packed sequences; set train.mtp_weight=0")
        batch = build_batch([(None, 0, n) for n in doc_lens], inputs.device)
        hidden = model.hidden_states(inputs.reshape(-1), batch)
        return LossSums(_ce_sum(model.logits(hidden)[None], targets.reshape(1, -1)), None)
    hidden = model.hidden_states(inputs)
    lm = _ce_sum(model.logits(hidden), targets)
    mtp_sum = None
    if mtp and len(model.mtp) and inputs.shape[1] > 1:
        mtp_sum = _ce_sum(model.mtp_logits(hidden[:, :-1], inputs[:, 1:]), targets[:, 1:])
    return LossSums(lm, mtp_sum)


def target_counts(targets: torch.Tensor) -> tuple[int, int]:
    """(main-loss tokens, MTP-loss tokens) of a batch."""
    valid = targets != IGNORE
    return int(valid.sum()), int(valid[:, 1:].sum())
