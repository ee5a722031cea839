"""GRPO (DeepSeekMath §4.1, DeepSeek-R1): group sampling, group-relative advantages, clipped ratio and a
KL penalty to a frozen reference model, on a verifiable task with a rule-based reward.

Per step: P prompts, G sampled completions o_1..o_G each (from the current policy, which is pi_old),
rewards r_i, advantages A_i = (r_i - mean(r)) / (std(r) + eps) for every token of o_i, then
    J = mean_i 1/|o_i| sum_t [ min(rho A_i, clip(rho, 1 - eps_c, 1 + eps_c) A_i) - beta KL_t ]
    rho = pi(o_t | q, o_<t) / pi_old(o_t | q, o_<t),   KL_t = pi_ref/pi - log(pi_ref/pi) - 1  (k3, >= 0)
and `updates_per_batch` gradient steps on -J. Single process.

Rollouts run through selfseek's own engine (EngineRollouts: paged KV cache, continuous batching, a prompt's
G samples sharing its cached blocks) on a copy of the policy refreshed in place after every step. Rewards are
R1's rules (rewards.py): the exact answer, plus `format_weight` x the <think> format reward.
"""

from __future__ import annotations

import copy
import itertools
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from selfseek.engine.engine import EngineArgs, LLMEngine, model_fingerprint
from selfseek.engine.kv_cache import root_key
from selfseek.engine.runner import kv_bytes_per_token
from selfseek.models.batch import AttnBatch, PrefillSegment
from selfseek.models.model import CausalLM
from selfseek.models.quant import QuantStack
from selfseek.sampling_params import SamplingParams
from selfseek.tokenizer import Tokenizer
from selfseek.train.build import make_trainable, set_threads
from selfseek.train.checkpoint import load_checkpoint_state, resolve_resume, save_checkpoint
from selfseek.train.config import (
    DPOConfig,
    DPOLoopConfig,
    GRPOConfig,
    GRPOLoopConfig,
    LoraConfig,
    TrainConfigError,
    to_dict,
)
from selfseek.train.data import IGNORE, collate
from selfseek.train.dist import init_distributed
from selfseek.train.export import dequantize_model, export_hf, read_config
from selfseek.train.lora import LoRAExperts, LoRALinear, apply_lora, float_weight, merge_lora, save_adapter
from selfseek.train.optim import clip_grads, lr_at, make_optimizer, set_lr
from selfseek.train.plots import MetricsLog, plot_run, truncate_metrics
from selfseek.train.rewards import accuracy_reward, format_reward
from selfseek.train.sft import load_base
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



# ---- rollouts through the engine -----------------------------------------------------------------------


def rollout_model(policy: nn.Module) -> CausalLM:
    """A plain copy of the policy for the engine: LoRA merged into the weights, no autograd, eval mode."""
    model = merge_lora(copy.deepcopy(policy))
    return model.requires_grad_(False).eval()


def trained_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training can change, under the names of the plain (merged) model: each adapted layer's merged
    weight W + (alpha / r) B A (a quantized base dequantized), and every other parameter that trains."""
    out: dict[str, torch.Tensor] = {}
    adapted = []
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            out[f"{name}.weight"] = m.weight
        elif isinstance(m, LoRAExperts):
            for proj in m.lora_A:
                stack = getattr(m.base, proj)
                if isinstance(stack, QuantStack):
                    stack = torch.stack([float_weight(stack, e) for e in range(stack.n)])
                out[f"{name}.{proj}"] = stack.float() + m.delta(proj)
        else:
            continue
        adapted.append(f"{name}.")
    for name, t in model.named_parameters(remove_duplicate=False):
        if t.requires_grad and not name.startswith(tuple(adapted)):
            out[name] = t
    return out


@torch.no_grad()
def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy what trains in src (LoRA merged) into dst in place: the engine's views of dst's tensors (fused
    projections, the model object it runs) stay valid. A name or shape dst lacks is an error."""
    own = dict(dst.named_parameters(remove_duplicate=False))
    for name, w in trained_weights(src).items():
        if name not in own:
            raise ValueError(f"copy_weights: the engine's model has no tensor {name!r}")
        if own[name].shape != w.shape:
            raise ValueError(f"copy_weights: {name!r} has shape {list(w.shape)} in the policy, "
                             f"{list(own[name].shape)} in the engine")
        own[name].copy_(w)


class EngineRollouts:
    """Samples through selfseek's engine (paged KV cache, continuous batching) on its own copy of the policy.

    A prompt's G samples are one request with n=G: the engine computes the prompt once and the G sequences
    share its full KV blocks (prefix caching). `refresh(policy)` copies the policy's new weights into the
    engine's model in place between steps and moves the engine to a new prefix-cache root (the fingerprint
    of a new weight version), so KV cached under the old weights is never read again.
    """

    def __init__(self, policy: nn.Module, tokenizer: Tokenizer, *, max_num_seqs: int, max_seq_len: int,
                 block_size: int = 16):
        self.model = rollout_model(policy)
        self.base_fingerprint = model_fingerprint(self.model)
        self.version = 0
        blocks = max_num_seqs * -(-max_seq_len // block_size) + 1
        args = EngineArgs(block_size=block_size, kv_cache_memory=blocks * block_size * kv_bytes_per_token(self.model),
                          max_num_seqs=max_num_seqs, max_num_batched_tokens=max(512, max_num_seqs),
                          model_fingerprint=self._fingerprint())
        self.engine = LLMEngine(self.model, tokenizer, args)
        self._ids = itertools.count()
        self.generated, self.seconds = 0, 0.0  # totals over all sample() calls: tokens/s

    def _fingerprint(self) -> str:
        return f"{self.base_fingerprint}:policy-v{self.version}"

    def refresh(self, policy: nn.Module) -> None:
        """Load the policy's current weights into the engine and invalidate its prefix cache."""
        if self.engine.has_work():
            raise RuntimeError("EngineRollouts.refresh: the engine still has requests running")
        copy_weights(policy, self.model)
        self.version += 1
        fp = self._fingerprint()
        blocks = self.engine.blocks
        self.engine.fingerprint = blocks.fingerprint = fp
        blocks.root = root_key(fp)  # every cached block hangs off the old root: none can match any more

    def sample(self, prompts: list[list[int]], n: int, max_new: int, temperature: float,
               seeds: list[int] | None = None) -> list[list[list[int]]]:
        """n completions (token ids, the stop token included when reached) of each prompt, all prompts in
        flight together; temperature 0 is greedy. seeds[i] seeds prompt i's samples (seed + j for sample j)."""
        t0 = time.perf_counter()
        rids = []
        for i, ids in enumerate(prompts):
            rid = f"rollout-{next(self._ids)}"
            params = SamplingParams(n=n, temperature=temperature, max_tokens=max_new,
                                    seed=None if seeds is None else seeds[i])
            self.engine.add_request(rid, self.engine.prepare(ids, params), params)
            rids.append(rid)
        out = {rid: [[] for _ in range(n)] for rid in rids}
        while self.engine.has_work():
            for d in self.engine.step():
                if d.error is not None:
                    raise RuntimeError(f"rollout {d.request_id} failed: {d.error}") from d.error
                out[d.request_id][d.index] += d.token_ids
        groups = [out[rid] for rid in rids]
        self.generated += sum(len(c) for g in groups for c in g)
        self.seconds += time.perf_counter() - t0
        return groups

    @property
    def tokens_per_s(self) -> float:
        return self.generated / max(self.seconds, 1e-9)


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


# ---- the policy (GRPO and DPO) -------------------------------------------------------------------------


def make_policy(model: CausalLM, lora: LoraConfig) -> CausalLM:
    """Train mode with LoRA adapters (lora.r > 0: the base frozen, quantized with lora.quantize) or every
    parameter trainable (full fine-tuning)."""
    if lora.quantize and lora.r <= 0:
        raise TrainConfigError("lora.quantize (QLoRA) needs adapters: set lora.r > 0")
    model.train()
    if lora.r > 0:
        apply_lora(model, lora.r, lora.alpha, lora.targets, experts=lora.experts, train_router=lora.train_router)
        return model
    return make_trainable(model)


def policy_config(model: CausalLM, base_path: Path) -> dict[str, Any] | None:
    """config.json of the trained model (None for a base without one, a GGUF: the adapter is the output)."""
    if not (base_path / "config.json").is_file():
        return None
    d = read_config(base_path)
    if d.get("model_type") in ("deepseek_v3", "deepseek_v32"):
        d["num_nextn_predict_layers"] = len(model.mtp)
    return d


def export_policy(model: CausalLM, lora: LoraConfig, base: str, base_path: Path, out: Path) -> None:
    """out/adapter (with LoRA) and out/final: the merged model as a Hugging Face folder."""
    if lora.r > 0:
        save_adapter(model, out / "adapter", base=base)
        model = merge_lora(copy.deepcopy(model))
    model_dict = policy_config(model, base_path)
    if model_dict is not None:
        export_hf(dequantize_model(model), model_dict, out / "final", base_path)


# ---- the loop -----------------------------------------------------------------------------------------


class PolicyTrainer:
    """What GRPO and DPO share: one process, a policy loaded from `cfg.base` (LoRA or full fine-tuning), and the
    loop: resume, evaluate every `loop.eval_every` steps, log, checkpoint, then export the policy and plot.
    A subclass loads its data and reference, calls `make_policy_trainable`, and defines train_step, evaluate
    (a dict of metrics; empty: nothing to evaluate), counters / restore (the checkpoint's state beyond the
    weights and optimizer), postfix (the progress bar's fields) and summary (run's result)."""

    job = ""

    def __init__(self, cfg: GRPOConfig | DPOConfig, loop: GRPOLoopConfig | DPOLoopConfig):
        set_threads(cfg.threads)
        self.cfg, self.loop = cfg, loop
        self.ctx = init_distributed(cfg.device)
        if self.ctx.active:
            raise ValueError(f"{self.job.upper()} runs on one process; start it without torchrun")
        self.policy, self.tok, self.base_path = load_base(cfg.base, self.ctx.device, cfg.lora.quantize)
        self.pad_id = self.tok.eos_id
        self.out = Path(cfg.out_dir)
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        self.step = 0

    def make_policy_trainable(self) -> None:
        make_policy(self.policy, self.cfg.lora)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.policy, self.cfg.optim)

    def train_step(self) -> dict[str, Any]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def counters(self) -> dict[str, Any]:
        return {}

    def restore(self, counters: dict[str, Any]) -> None:
        """Take back `counters()` from a checkpoint's state."""

    def postfix(self, rec: dict[str, Any], latest: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{rec['loss']:.3f}"}

    def summary(self, start: dict[str, float], latest: dict[str, float]) -> dict[str, Any]:
        return {}

    def run(self) -> dict[str, Any]:
        cfg, loop = self.cfg, self.loop
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        job = {"job": self.job, "config": to_dict(cfg), "model_config": policy_config(self.policy, self.base_path),
               "tokenizer": str(self.base_path)}
        resume = resolve_resume(loop.resume, self.out)
        if resume is not None:
            c = load_checkpoint_state(resume, self.policy, self.optimizer)
            self.step = c["step"]
            self.restore(c)
        truncate_metrics(self.metrics.path, self.step)  # a fresh run (step 0): no records of an earlier one
        start = latest = self.evaluate()
        if self.step == 0 and start:
            self.metrics.write({"step": 0, **start})
        bar = tqdm(total=loop.steps, initial=self.step, unit="step", disable=not loop.progress, dynamic_ncols=True)
        t0 = time.perf_counter()
        while self.step < loop.steps:
            rec = self.train_step()
            evaluated = {}
            if loop.eval_every and (self.step % loop.eval_every == 0 or self.step == loop.steps):
                latest = evaluated = self.evaluate()
                rec.update(latest)
            rec["elapsed_s"] = round(time.perf_counter() - t0, 3)
            if self.step % max(loop.log_every, 1) == 0 or evaluated:
                self.metrics.write(rec)
            if loop.checkpoint_every and self.step % loop.checkpoint_every == 0:
                save_checkpoint(self.out, self.step, self.policy, self.optimizer, self.counters(), job,
                                keep=loop.keep_checkpoints)
            bar.set_postfix(**self.postfix(rec, latest))
            bar.update(1)
        bar.close()
        if not loop.eval_every:
            latest = self.evaluate()
            if latest:
                self.metrics.write({"step": self.step, **latest})
        export_policy(self.policy, cfg.lora, cfg.base, self.base_path, self.out)
        plot_run(self.metrics.path, self.out)
        return {"step": self.step, **self.summary(start, latest), "wall_s": time.perf_counter() - t0,
                "export": str(self.out / "final")}


class GRPOTrainer(PolicyTrainer):
    job = "grpo"

    def __init__(self, cfg: GRPOConfig):
        super().__init__(cfg, cfg.grpo)
        self.task = make_task(cfg.task.name, max_operand=cfg.task.max_operand, ops=cfg.task.ops)
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.make_policy_trainable()
        self.eval_problems = self.task.problems(cfg.task.n_eval, seed=cfg.seed + 1)
        self.rng = random.Random(cfg.seed)  # training problems and the seeds of their samples
        g = cfg.grpo
        longest = max(len(self.prompt_ids(p)) for p in self.eval_problems) + g.max_new_tokens
        self.rollouts = EngineRollouts(self.policy, self.tok, max_num_seqs=g.prompts_per_step * g.group_size,
                                       max_seq_len=2 * longest, block_size=g.engine_block_size)

    def prompt_ids(self, p: Problem) -> list[int]:
        return self.tok.encode(self.tok.apply_chat_template(p.messages(), add_generation_prompt=True))

    def completion_text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def reward(self, completion_ids: list[int], answer: str) -> float:
        """R1's rule reward: exact answer, plus format_weight x the <think> format reward."""
        text = self.completion_text(completion_ids)
        r = accuracy_reward(text, answer)
        return r + self.cfg.grpo.format_weight * format_reward(text) if self.cfg.grpo.format_weight else r

    def evaluate(self) -> dict[str, float]:
        """On the fixed evaluation problems: the mean reward of `eval_samples` completions each, sampled as in
        training (what GRPO maximises; same seed every time), and the greedy accuracy."""
        g = self.cfg.grpo
        prompts = [self.prompt_ids(p) for p in self.eval_problems]
        seeds = [(self.cfg.seed + 2) * 1_000_003 + i * g.eval_samples for i in range(len(prompts))]
        sampled = self.rollouts.sample(prompts, g.eval_samples, g.max_new_tokens, g.temperature, seeds)
        greedy_out = self.rollouts.sample(prompts, 1, g.max_new_tokens, 0.0)
        rewards, hits = [], []
        for p, group, (best,) in zip(self.eval_problems, sampled, greedy_out, strict=True):
            rewards += [self.reward(c, p.answer) for c in group]
            hits.append(self.reward(best, p.answer))
        return {"eval_reward": sum(rewards) / len(rewards), "eval_greedy": sum(hits) / len(hits)}

    def train_step(self) -> dict[str, Any]:
        g = self.cfg.grpo
        problems = [self.task.sample(self.rng) for _ in range(g.prompts_per_step)]
        prompt_ids = [self.prompt_ids(p) for p in problems]
        seeds = [self.rng.getrandbits(62) for _ in problems]
        t0, n0 = self.rollouts.seconds, self.rollouts.generated
        groups = self.rollouts.sample(prompt_ids, g.group_size, g.max_new_tokens, g.temperature, seeds)
        rollout_tok_s = (self.rollouts.generated - n0) / max(self.rollouts.seconds - t0, 1e-9)
        prompts, completions, rewards = [], [], []
        for p, ids, group in zip(problems, prompt_ids, groups, strict=True):
            prompts += [ids] * g.group_size
            completions += group
            rewards.append([self.reward(c, p.answer) for c in group])
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
        self.rollouts.refresh(self.policy)  # the next rollouts sample from the updated policy
        self.step += 1
        return {"step": self.step, "reward": r.mean().item(), "loss": loss.item(), "kl": kl.item(),
                "grad_norm": grad_norm, "completion_len": mask.sum(1).mean().item(),
                "lr": self.optimizer.param_groups[0]["lr"], "rollout_tokens_per_s": round(rollout_tok_s, 1)}

    def counters(self) -> dict[str, Any]:
        return {"task_rng": self.rng.getstate()}

    def restore(self, counters: dict[str, Any]) -> None:
        self.rng.setstate(counters["task_rng"])
        self.rollouts.refresh(self.policy)

    def postfix(self, rec: dict[str, Any], latest: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{rec['reward']:.2f}", "eval": f"{latest['eval_reward']:.2f}", "kl": f"{rec['kl']:.3f}"}

    def summary(self, start: dict[str, float], latest: dict[str, float]) -> dict[str, Any]:
        return {"eval_reward_start": start["eval_reward"], "eval_reward_end": latest["eval_reward"],
                "eval_greedy_start": start["eval_greedy"], "eval_greedy_end": latest["eval_greedy"],
                "rollout_tokens_per_s": self.rollouts.tokens_per_s}


def run_grpo(cfg: GRPOConfig) -> dict[str, Any]:
    return GRPOTrainer(cfg).run()
