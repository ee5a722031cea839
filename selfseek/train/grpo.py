"""GRPO (DeepSeekMath §4.1, DeepSeek-R1): group sampling, group-relative advantages, clipped ratio and a
KL penalty to a frozen reference model, on a verifiable task with a rule-based reward.

Per step: P prompts, G sampled completions o_1..o_G each (from the current policy, which is pi_old),
rewards r_i, advantages A_i = (r_i - mean(r)) / (std(r) + eps) for every token of o_i, then
    J = mean_i 1/|o_i| sum_t [ min(rho A_i, clip(rho, 1 - eps_c, 1 + eps_c) A_i) - beta KL_t ]
    rho = pi(o_t | q, o_<t) / pi_old(o_t | q, o_<t),   KL_t = pi_ref/pi - log(pi_ref/pi) - 1  (k3, >= 0)
and `updates_per_batch` gradient steps on -J. Single process.
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from selfseek.models.batch import AttnBatch, PrefillSegment
from selfseek.models.model import CausalLM
from selfseek.tokenizer import Tokenizer
from selfseek.train.build import load_trainable, set_threads
from selfseek.train.checkpoint import load_checkpoint_state, resolve_resume, save_checkpoint
from selfseek.train.config import GRPOConfig, to_dict
from selfseek.train.data import IGNORE, collate
from selfseek.train.dist import init_distributed
from selfseek.train.export import export_hf, read_config
from selfseek.train.lora import apply_lora, merge_lora, save_adapter
from selfseek.train.optim import clip_grads, lr_at, make_optimizer, set_lr
from selfseek.train.plots import MetricsLog, plot_run, truncate_metrics
from selfseek.train.sft import load_base_tokenizer
from selfseek.train.tasks import Problem, make_task

# ---- sampling -------------------------------------------------------------------------------------------


def packed_logits(model: CausalLM, tokens: torch.Tensor, max_segment_tokens: int = 256) -> torch.Tensor:
    """logits [b, s, V] of b independent rows [b, s].

    The model's own [b, s] path attends row by row, one call per row and layer, which dominates for many
    short rows (GRPO's groups). Here consecutive rows share one attention segment with a block-diagonal
    causal mask and positions restarting per row: the same result in a few calls.
    """
    b, s = tokens.shape
    per = max(1, max_segment_tokens // s)
    device = tokens.device
    q = torch.arange(per * s, device=device)
    same_row = (q[:, None] // s) == (q[None, :] // s)
    allowed = same_row & (q[None, :] <= q[:, None])
    full_mask = torch.zeros(per * s, per * s, device=device).masked_fill(~allowed, float("-inf"))
    segments = []
    for start in range(0, b, per):
        n = min(per, b - start) * s
        segments.append(PrefillSegment(start * s, start * s + n, full_mask[:n, :n]))
    batch = AttnBatch(positions=torch.arange(s, device=device).repeat(b), slot_mapping=None, prefills=segments)
    return model.logits(model.hidden_states(tokens.reshape(-1), batch)).view(b, s, -1)



@torch.no_grad()
def _sample_rows(
    model: CausalLM, rows: torch.Tensor, eos_id: int, max_new: int, temperature: float,
    generator: torch.Generator | None,
) -> list[list[int]]:
    """Extend every row of rows [n, L] (same-length prompts) until EOS or max_new tokens.

    Each step re-runs the model over the whole sequence (no KV cache): completions here are a few tokens
    long, and the paged-cache engine will take this over.
    """
    was_training = model.training
    model.eval()
    n = rows.shape[0]
    done = torch.zeros(n, dtype=torch.bool)
    out: list[list[int]] = [[] for _ in range(n)]
    for _ in range(max_new):
        logits = packed_logits(model, rows)[:, -1].float().cpu()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = logits.argmax(dim=-1)
        for i in range(n):
            if not done[i]:
                out[i].append(int(nxt[i]))
        done |= nxt == eos_id
        if done.all():
            break
        rows = torch.cat([rows, nxt.to(rows.device)[:, None]], dim=1)
    model.train(was_training)
    return out


def sample_group(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    n: int,
    max_new: int,
    temperature: float,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """n completions (token ids, EOS included when reached) of one prompt, sampled as one batch."""
    return sample_groups(model, tokenizer, [prompt_ids], n, max_new, temperature, generator)[0]


def sample_groups(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    n: int,
    max_new: int,
    temperature: float,
    generator: torch.Generator | None = None,
) -> list[list[list[int]]]:
    """n completions of each prompt; prompts of equal length share one batch (temperature 0: greedy)."""
    device = next(model.parameters()).device
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    out: list[list[list[int]]] = [[] for _ in prompts]
    for idx in by_len.values():
        rows = torch.tensor([prompts[i] for i in idx for _ in range(n)], dtype=torch.long, device=device)
        done = _sample_rows(model, rows, tokenizer.eos_id, max_new, temperature, generator)
        for j, i in enumerate(idx):
            out[i] = done[j * n : (j + 1) * n]
    return out


def greedy(model: CausalLM, tokenizer: Tokenizer, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy completions of many prompts, batched by prompt length."""
    return [g[0] for g in sample_groups(model, tokenizer, prompts, 1, max_new, 0.0)]


# ---- the objective ------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """rewards [P, G] -> (r - mean) / (std + eps) within each group (0 where all rewards are equal)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate pi_ref/pi - log(pi_ref/pi) - 1 (unbiased, never negative)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
    clip_eps: float, beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-J over sequences: logp/old/ref/mask [N, T], adv [N]. Returns (loss, mean KL per token)."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    kl = k3_kl(logp, ref_logp)
    per_token = (surrogate - beta * kl) * mask
    per_seq = per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return -per_seq.mean(), (kl * mask).sum() / mask.sum().clamp(min=1)


def token_logprobs(
    model: CausalLM, inputs: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log pi(target_t | inputs_<=t) [N, T] (0 where the target is IGNORE), pi being the distribution sampled
    from (logits / temperature), so that the importance ratios compare like with like."""
    logits = packed_logits(model, inputs).float() / (temperature if temperature > 0 else 1.0)
    safe = targets.clamp(min=0)
    logp = F.log_softmax(logits, dim=-1).gather(-1, safe[..., None]).squeeze(-1)
    return logp * (targets != IGNORE)


def rollout_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """(inputs, targets, mask): targets are the completion tokens, IGNORE on the prompt and padding."""
    items = []
    for p, c in zip(prompts, completions, strict=True):
        seq = torch.tensor(p + c, dtype=torch.long)
        labels = torch.tensor([IGNORE] * len(p) + c, dtype=torch.long)
        items.append((seq[:-1], labels[1:]))
    inputs, targets = collate(items, pad_id)
    return inputs, targets, (targets != IGNORE).float()


# ---- the loop -----------------------------------------------------------------------------------------


class GRPOTrainer:
    def __init__(self, cfg: GRPOConfig):
        set_threads(cfg.threads)
        self.cfg = cfg
        self.ctx = init_distributed(cfg.device)
        if self.ctx.active:
            raise ValueError("GRPO runs on one process; start it without torchrun")
        self.tok = load_base_tokenizer(cfg.base)
        self.task = make_task(cfg.task.name, max_operand=cfg.task.max_operand, ops=cfg.task.ops)
        self.policy = load_trainable(cfg.base, self.ctx.device)
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        if cfg.lora.r > 0:
            apply_lora(self.policy, cfg.lora.r, cfg.lora.alpha, cfg.lora.targets)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.policy, cfg.optim)
        self.out = Path(cfg.out_dir)
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        self.eval_problems = self.task.problems(cfg.task.n_eval, seed=cfg.seed + 1)
        self.rng = random.Random(cfg.seed)  # training problems
        self.gen = torch.Generator().manual_seed(cfg.seed)  # sampling
        self.step = 0
        self.pad_id = self.tok.eos_id

    def prompt_ids(self, p: Problem) -> list[int]:
        return self.tok.encode(self.tok.apply_chat_template(p.messages(), add_generation_prompt=True))

    def completion_text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def evaluate(self) -> dict[str, float]:
        """On the fixed evaluation problems: the mean reward of `eval_samples` completions each, sampled as in
        training (what GRPO maximises; same seed every time), and the greedy accuracy."""
        g = self.cfg.grpo
        prompts = [self.prompt_ids(p) for p in self.eval_problems]
        gen = torch.Generator().manual_seed(self.cfg.seed + 2)
        sampled = sample_groups(self.policy, self.tok, prompts, g.eval_samples, g.max_new_tokens, g.temperature, gen)
        greedy_out = greedy(self.policy, self.tok, prompts, g.max_new_tokens)
        rewards, hits = [], []
        for p, group, best in zip(self.eval_problems, sampled, greedy_out, strict=True):
            rewards += [self.task.reward(self.completion_text(c), p.answer) for c in group]
            hits.append(self.task.reward(self.completion_text(best), p.answer))
        return {"eval_reward": sum(rewards) / len(rewards), "eval_greedy": sum(hits) / len(hits)}

    def train_step(self) -> dict[str, Any]:
        g = self.cfg.grpo
        problems = [self.task.sample(self.rng) for _ in range(g.prompts_per_step)]
        prompt_ids = [self.prompt_ids(p) for p in problems]
        groups = sample_groups(self.policy, self.tok, prompt_ids, g.group_size, g.max_new_tokens, g.temperature,
                               self.gen)
        prompts, completions, rewards = [], [], []
        for p, ids, group in zip(problems, prompt_ids, groups, strict=True):
            prompts += [ids] * g.group_size
            completions += group
            rewards.append([self.task.reward(self.completion_text(c), p.answer) for c in group])
        r = torch.tensor(rewards)
        adv = group_advantages(r).flatten().to(self.ctx.device)
        inputs, targets, mask = (t.to(self.ctx.device) for t in rollout_batch(prompts, completions, self.pad_id))
        with torch.no_grad():
            old = token_logprobs(self.policy, inputs, targets, g.temperature)
            ref = token_logprobs(self.reference, inputs, targets, g.temperature)
        set_lr(self.optimizer, lr_at(self.step, g.steps, self.cfg.optim))
        for _ in range(g.updates_per_batch):
            logp = token_logprobs(self.policy, inputs, targets, g.temperature)
            loss, kl = grpo_loss(logp, old, ref, adv, mask, g.clip_eps, g.beta)
            loss.backward()
            grad_norm = clip_grads(self.params, self.cfg.optim.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "reward": r.mean().item(), "loss": loss.item(), "kl": kl.item(),
                "grad_norm": grad_norm, "completion_len": mask.sum(1).mean().item(),
                "lr": self.optimizer.param_groups[0]["lr"]}

    def counters(self) -> dict[str, Any]:
        return {"task_rng": self.rng.getstate(), "sample_gen": self.gen.get_state()}

    def run(self) -> dict[str, Any]:
        cfg, g = self.cfg, self.cfg.grpo
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        job = {"job": "grpo", "config": to_dict(cfg), "model_config": self._model_dict(), "tokenizer": cfg.base}
        resume = resolve_resume(g.resume, self.out)
        if resume is not None:
            c = load_checkpoint_state(resume, self.policy, self.optimizer)
            self.step = c["step"]
            self.rng.setstate(c["task_rng"])
            self.gen.set_state(c["sample_gen"])
            truncate_metrics(self.metrics.path, self.step)
        else:
            truncate_metrics(self.metrics.path, 0)
        start = self.evaluate()
        if self.step == 0:
            self.metrics.write({"step": 0, **start})
        bar = tqdm(total=g.steps, initial=self.step, unit="step", disable=not g.progress, dynamic_ncols=True)
        t0 = time.perf_counter()
        latest = start
        while self.step < g.steps:
            rec = self.train_step()
            if g.eval_every and (self.step % g.eval_every == 0 or self.step == g.steps):
                latest = self.evaluate()
                rec.update(latest)
            rec["elapsed_s"] = round(time.perf_counter() - t0, 3)
            if self.step % max(g.log_every, 1) == 0 or "eval_reward" in rec:
                self.metrics.write(rec)
            if g.checkpoint_every and self.step % g.checkpoint_every == 0:
                save_checkpoint(self.out, self.step, self.policy, self.optimizer, self.counters(), job,
                                keep=g.keep_checkpoints)
            bar.set_postfix(reward=f"{rec['reward']:.2f}", eval=f"{latest['eval_reward']:.2f}", kl=f"{rec['kl']:.3f}")
            bar.update(1)
        bar.close()
        if not g.eval_every:
            latest = self.evaluate()
            self.metrics.write({"step": self.step, **latest})
        self.export(self.out / "final")
        plot_run(self.metrics.path, self.out)
        return {"step": self.step, "eval_reward_start": start["eval_reward"], "eval_reward_end": latest["eval_reward"],
                "eval_greedy_start": start["eval_greedy"], "eval_greedy_end": latest["eval_greedy"],
                "wall_s": time.perf_counter() - t0, "export": str(self.out / "final")}

    def _model_dict(self) -> dict[str, Any]:
        d = read_config(self.cfg.base)
        if d.get("model_type") == "deepseek_v3":
            d["num_nextn_predict_layers"] = len(self.policy.mtp)
        return d

    def export(self, path: Path) -> None:
        model = self.policy
        if self.cfg.lora.r > 0:
            save_adapter(model, self.out / "adapter", self.cfg.lora.targets, base=self.cfg.base)
            model = merge_lora(copy.deepcopy(model))
        export_hf(model, self._model_dict(), path, self.cfg.base)


def run_grpo(cfg: GRPOConfig) -> dict[str, Any]:
    return GRPOTrainer(cfg).run()
