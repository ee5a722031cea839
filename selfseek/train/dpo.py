"""DPO (Rafailov et al. 2023, eq. 7) on preference pairs, full fine-tuning or LoRA:

    L = -log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

log pi(y|x) is the sum over the response tokens (the assistant reply and its end-of-turn token, rendered with
the model's chat template). The reference is the frozen starting model (with LoRA: the base without adapters);
it never changes, so its log-probs of every pair are computed once, before training (and before a resume
loads trained weights), and no second model is kept in memory.

Data: JSONL lines {"prompt": str | [messages], "chosen": str | [assistant message], "rejected": ...}; a
string prompt is one user turn. Metrics: loss, and on held-out pairs the implicit reward margin
(the bracket above, without beta) and the fraction of pairs it ranks right.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from selfseek.models.model import CausalLM
from selfseek.tokenizer import Tokenizer
from selfseek.train.config import DPOConfig, TrainConfigError
from selfseek.train.data import IGNORE, Order, collate, encode_chat, jsonl_records, split_holdout
from selfseek.train.grpo import PolicyTrainer, token_logprobs
from selfseek.train.optim import clip_grads, lr_at, set_lr


@dataclass
class Pair:
    source: str  # file:line, for errors
    prompt: list[dict]
    chosen: str
    rejected: str


def _reply(value: Any, key: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if (isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str)):
        return value[0]["content"]
    raise TrainConfigError(f"{where}: {key!r} must be a string or a list of one assistant message")


def read_pairs(paths: list[str] | str) -> list[Pair]:
    """Preference pairs from JSONL files; a bad line is an error naming the file and line."""
    paths = [paths] if isinstance(paths, str) else paths
    out = []
    for src in paths:
        f = Path(src)
        if not f.is_file():
            raise TrainConfigError(f"preference data {src!r}: no such file")
        for where, rec in jsonl_records(f):
            if not isinstance(rec, dict) or not all(k in rec for k in ("prompt", "chosen", "rejected")):
                raise TrainConfigError(f"{where}: expected an object with 'prompt', 'chosen' and 'rejected'")
            prompt = rec["prompt"]
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            if not (isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt)):
                raise TrainConfigError(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages")
            out.append(Pair(where, prompt, _reply(rec["chosen"], "chosen", where),
                            _reply(rec["rejected"], "rejected", where)))
    if not out:
        raise TrainConfigError(f"preference data {paths}: no pairs")
    return out


def encode_response(prompt: list[dict], reply: str, tok: Tokenizer, max_len: int, where: str):
    """(inputs, targets) of prompt + reply: targets are the reply's tokens (and its end-of-turn), IGNORE on the
    prompt, shifted for next-token prediction."""
    ids, labels = encode_chat([*prompt, {"role": "assistant", "content": reply}], tok)
    n_prompt = len(tok.encode(tok.apply_chat_template(prompt, add_generation_prompt=True)))
    labels = [IGNORE] * n_prompt + labels[n_prompt:]  # earlier assistant turns of the prompt are context only
    if len(ids) > max_len + 1:
        raise TrainConfigError(f"{where}: {len(ids)} tokens, more than data.max_len ({max_len})")
    if all(t == IGNORE for t in labels[1:]):
        raise TrainConfigError(f"{where}: the reply has no tokens")
    return torch.tensor(ids[:-1]), torch.tensor(labels[1:])


class PairSet:
    """Encoded pairs: item i -> ((chosen inputs, targets), (rejected inputs, targets))."""

    def __init__(self, pairs: list[Pair], tok: Tokenizer, max_len: int):
        self.items = [(encode_response(p.prompt, p.chosen, tok, max_len, p.source),
                       encode_response(p.prompt, p.rejected, tok, max_len, p.source)) for p in pairs]
        self.ref: torch.Tensor | None = None  # [n, 2] reference log-probs (chosen, rejected), set once

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, idx: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows chosen_0, rejected_0, chosen_1, ... -> (inputs, targets) [2 len(idx), s]."""
        return collate([row for i in idx for row in self.items[i]], pad_id)


def sequence_logprobs(model: CausalLM, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over each row's target tokens of log pi(token | before) -> [rows]."""
    return token_logprobs(model, inputs, targets).sum(dim=1)


def dpo_loss(logp: torch.Tensor, ref: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logp, ref [n, 2] (chosen, rejected) -> (mean loss, margins [n]) with margin = the implicit reward
    difference (log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)."""
    ratio = logp - ref
    margin = ratio[:, 0] - ratio[:, 1]
    return -F.logsigmoid(beta * margin).mean(), margin


class DPOTrainer(PolicyTrainer):
    job = "dpo"

    def __init__(self, cfg: DPOConfig):
        if not cfg.data.train:
            raise TrainConfigError("data.train: list the preference JSONL files")
        super().__init__(cfg, cfg.dpo)
        pairs = read_pairs(cfg.data.train)
        if cfg.data.valid:
            train, valid = pairs, read_pairs(cfg.data.valid)
        else:
            train, valid = split_holdout(pairs, cfg.data.valid_fraction, cfg.seed,
                                         key=lambda p: json.dumps([p.prompt, p.chosen, p.rejected]))
        if not train:
            raise TrainConfigError("data.valid_fraction leaves no training pairs")
        self.train_set = PairSet(train, self.tok, cfg.data.max_len)
        self.valid_set = PairSet(valid, self.tok, cfg.data.max_len) if valid else None
        self.make_policy_trainable()
        # The reference: the model as loaded (LoRA's B starts at zero, so the adapted model is the base).
        for s in (self.train_set, self.valid_set):
            if s is not None:
                s.ref = self.logprobs(s, range(len(s)))
        self.order = Order(len(self.train_set), cfg.seed)
        self.position = 0

    @torch.no_grad()
    def logprobs(self, data: PairSet, idx, chunk: int = 16) -> torch.Tensor:
        """[len(idx), 2] summed log-probs of (chosen, rejected) under the current policy, in chunks."""
        idx, out = list(idx), []
        for j in range(0, len(idx), chunk):
            inputs, targets = data.batch(idx[j : j + chunk], self.pad_id)
            dev = self.ctx.device
            out.append(sequence_logprobs(self.policy, inputs.to(dev), targets.to(dev)).view(-1, 2).cpu())
        return torch.cat(out)

    def evaluate(self) -> dict[str, float]:
        if self.valid_set is None:
            return {}
        logp = self.logprobs(self.valid_set, range(len(self.valid_set)))
        loss, margin = dpo_loss(logp, self.valid_set.ref, self.cfg.dpo.beta)
        return {"val_loss": loss.item(), "val_margin": margin.mean().item(),
                "val_accuracy": (margin > 0).float().mean().item()}

    def train_step(self) -> dict[str, Any]:
        d = self.cfg.dpo
        idx = self.order.indices(self.position, d.batch_size)
        set_lr(self.optimizer, lr_at(self.step, d.steps, self.cfg.optim))
        inputs, targets = self.train_set.batch(idx, self.pad_id)
        dev = self.ctx.device
        logp = sequence_logprobs(self.policy, inputs.to(dev), targets.to(dev)).view(-1, 2)
        loss, margin = dpo_loss(logp, self.train_set.ref[idx].to(dev), d.beta)
        loss.backward()
        grad_norm = clip_grads(self.params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.position += d.batch_size
        return {"step": self.step, "loss": loss.item(), "margin": margin.mean().item(),
                "accuracy": (margin > 0).float().mean().item(), "grad_norm": grad_norm,
                "lr": self.optimizer.param_groups[0]["lr"]}

    def counters(self) -> dict[str, Any]:
        return {"position": self.position}

    def restore(self, counters: dict[str, Any]) -> None:
        self.position = counters["position"]

    def postfix(self, rec: dict[str, Any], latest: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{rec['loss']:.3f}", "margin": f"{rec['margin']:.2f}"}

    def summary(self, start: dict[str, float], latest: dict[str, float]) -> dict[str, Any]:
        return {"val_margin_start": start.get("val_margin"), "val_margin_end": latest.get("val_margin"),
                "val_accuracy_end": latest.get("val_accuracy")}


def run_dpo(cfg: DPOConfig) -> dict[str, Any]:
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return DPOTrainer(cfg).run()
