"""The supervised training loop shared by pretraining and SFT.

One optimizer step = one global batch of `batch_size` sequences, split over processes (contiguous slices)
and micro-batches (gradient accumulation). Every loss term is divided by its count over the global batch
(target tokens, MTP target tokens, sequences) before backward, and gradients are summed over processes:
the update is the same whatever the number of processes or micro-batches. After the optimizer step the
routing biases take their aux-loss-free step from the global per-expert loads.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from selfseek.models.model import CausalLM
from selfseek.train.balance import RouterMonitor, load_ratio
from selfseek.train.checkpoint import load_checkpoint_state, resolve_resume, save_checkpoint
from selfseek.train.config import LoopConfig, OptimConfig, TrainConfigError
from selfseek.train.data import Order, collate, micro_batches
from selfseek.train.dist import DistContext
from selfseek.train.losses import lm_losses, target_counts
from selfseek.train.optim import clip_grads, lr_at, make_optimizer, set_lr
from selfseek.train.plots import MetricsLog, plot_run, truncate_metrics


class Trainer:
    def __init__(
        self,
        *,
        model: CausalLM,
        loop: LoopConfig,
        optim: OptimConfig,
        train_data,
        valid_data,
        pad_id: int,
        seed: int,
        out_dir: str | Path,
        ctx: DistContext,
        job_config: dict[str, Any],
        export: Callable[[CausalLM, Path], None] | None = None,
    ):
        self.model, self.loop, self.optim_cfg = model, loop, optim
        self.train_data, self.valid_data, self.pad_id, self.seed = train_data, valid_data, pad_id, seed
        self.out_dir, self.ctx, self.job_config, self.export = Path(out_dir), ctx, job_config, export
        b, m, w = loop.batch_size, loop.micro_batch_size, ctx.world
        if m < 1 or b % (m * w):
            raise TrainConfigError(
                f"train.batch_size ({b}) must be a multiple of train.micro_batch_size ({m}) x processes ({w})"
            )
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(model, optim)
        self.monitor = RouterMonitor(model, seq_aux=loop.seq_aux_alpha > 0)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", enabled=ctx.is_main)
        self.step, self.position, self.tokens_seen = 0, 0, 0
        self.history: list[dict[str, Any]] = []  # every step's record, on every rank (tests read it)

    # ---- one step ---------------------------------------------------------------------------------
    def _autocast(self):
        if not self.loop.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16)

    def train_step(self, order: Order) -> dict[str, Any]:
        cfg, ctx, dev = self.loop, self.ctx, self.ctx.device
        lr = lr_at(self.step, cfg.steps, self.optim_cfg)
        set_lr(self.optimizer, lr)
        batches = micro_batches(
            self.train_data, order, self.position, cfg.batch_size, cfg.micro_batch_size, ctx.rank, ctx.world,
            self.pad_id,
        )
        counts = torch.tensor([sum(target_counts(t)[i] for _, t in batches) for i in (0, 1)], dtype=torch.float64)
        n_lm, n_mtp = ctx.sum_(counts).tolist()
        n_seq = cfg.batch_size
        use_mtp = cfg.mtp_weight > 0 and len(self.model.mtp) > 0
        sums = torch.zeros(3, dtype=torch.float64)  # main CE, MTP CE, balance terms
        for inputs, targets in batches:
            inputs, targets = inputs.to(dev), targets.to(dev)
            self.monitor.rows = inputs.shape[0]
            with self._autocast():
                ls = lm_losses(self.model, inputs, targets, mtp=use_mtp)
                bal = self.monitor.pop_loss()
            loss = ls.lm / max(n_lm, 1)
            if ls.mtp is not None:
                loss = loss + cfg.mtp_weight * ls.mtp / max(n_mtp, 1)
            if bal is not None:
                loss = loss + cfg.seq_aux_alpha * bal / n_seq
            loss.backward()
            sums += torch.tensor([ls.lm.item(), ls.mtp.item() if ls.mtp is not None else 0.0,
                                  bal.item() if bal is not None else 0.0], dtype=torch.float64)
        ctx.sum_grads(self.params)
        grad_norm = clip_grads(self.params, self.optim_cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        loads = self.monitor.take_counts()
        if loads:  # global per-expert loads, one all-reduce for all layers
            stacked = ctx.sum_(torch.stack(list(loads.values())))
            loads = dict(zip(loads, stacked, strict=True))
            self.monitor.update_biases(loads, cfg.bias_update_speed)
        ctx.sum_(sums)
        self.step += 1
        self.position += cfg.batch_size
        self.tokens_seen += int(n_lm)
        record: dict[str, Any] = {"step": self.step, "loss": sums[0].item() / max(n_lm, 1), "lr": lr,
                                  "grad_norm": grad_norm}
        if use_mtp:
            record["mtp_loss"] = sums[1].item() / max(n_mtp, 1)
        if cfg.seq_aux_alpha > 0 and loads:
            record["balance_loss"] = sums[2].item() / n_seq
        if loads:
            record["expert_load"] = {k: round(load_ratio(v), 4) for k, v in loads.items() if v.sum() > 0}
        return record

    # ---- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean next-token loss over the first eval_batches micro-batches of validation data."""
        if self.valid_data is None or len(self.valid_data) == 0:
            return None
        cfg, ctx = self.loop, self.ctx
        n = min(len(self.valid_data), cfg.eval_batches * cfg.micro_batch_size)
        mine = list(range(ctx.rank, n, ctx.world))
        sums = torch.zeros(2, dtype=torch.float64)
        self.model.eval()
        for j in range(0, len(mine), cfg.micro_batch_size):
            inputs, targets = collate([self.valid_data[i] for i in mine[j : j + cfg.micro_batch_size]], self.pad_id)
            with self._autocast():
                ls = lm_losses(self.model, inputs.to(ctx.device), targets.to(ctx.device), mtp=False)
            sums += torch.tensor([ls.lm.item(), target_counts(targets)[0]], dtype=torch.float64)
        self.model.train()
        ctx.sum_(sums)
        return sums[0].item() / max(sums[1].item(), 1)

    # ---- the loop -----------------------------------------------------------------------------------
    def counters(self) -> dict[str, Any]:
        return {"position": self.position, "tokens_seen": self.tokens_seen}

    def save(self) -> Path:
        path = save_checkpoint(self.out_dir, self.step, self.model, self.optimizer, self.counters(), self.job_config,
                               self.ctx.rank, self.loop.keep_checkpoints)
        self.ctx.barrier()
        return path

    def resume(self) -> None:
        path = resolve_resume(self.loop.resume, self.out_dir)
        if path is None:
            if self.ctx.is_main:
                truncate_metrics(self.metrics.path, 0)  # a fresh run: no records of an earlier one
            return
        c = load_checkpoint_state(path, self.model, self.optimizer, self.ctx.rank)
        self.step, self.position, self.tokens_seen = c["step"], c["position"], c["tokens_seen"]
        if self.ctx.is_main:
            truncate_metrics(self.metrics.path, self.step)

    def run(self) -> dict[str, Any]:
        cfg, ctx = self.loop, self.ctx
        self.resume()
        order = Order(len(self.train_data), self.seed)
        stop = min(cfg.steps, cfg.stop_after) if cfg.stop_after is not None else cfg.steps
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (ctx.is_main and cfg.progress))
        start, start_tokens = time.perf_counter(), self.tokens_seen
        mark, mark_tokens = start, self.tokens_seen
        last: dict[str, Any] = {}
        val_loss = None
        try:
            while self.step < stop:
                record = self.train_step(order)
                now = time.perf_counter()
                record["tokens_per_s"] = (self.tokens_seen - mark_tokens) / max(now - mark, 1e-9)
                record["tokens_seen"] = self.tokens_seen
                mark, mark_tokens = now, self.tokens_seen
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == stop):
                    val_loss = self.evaluate()
                    if val_loss is not None:
                        record["val_loss"] = val_loss
                record["elapsed_s"] = round(now - start, 3)
                self.history.append(record)
                if self.step % max(cfg.log_every, 1) == 0 or self.step in (1, stop) or "val_loss" in record:
                    self.metrics.write(record)
                periodic = cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or self.step == stop)
                if periodic or self.step == stop < cfg.steps:  # a stopped run can always be resumed
                    self.save()
                    if ctx.is_main:
                        plot_run(self.metrics.path, self.out_dir)
                last = record
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                **({"val": f"{val_loss:.3f}"} if val_loss is not None else {}))
                bar.update(1)
        except KeyboardInterrupt:
            if not ctx.active and self.step > 0:
                path = self.save()
                print(f"\ninterrupted: checkpoint of step {self.step} in {path} (resume with --set train.resume=auto)")
            raise
        finally:
            bar.close()
            self.monitor.remove()
        wall = time.perf_counter() - start
        summary = {"rank": ctx.rank, "step": self.step, "loss": last.get("loss"), "val_loss": val_loss, "wall_s": wall,
                   "tokens_per_s": (self.tokens_seen - start_tokens) / max(wall, 1e-9)}
        if self.step >= cfg.steps and ctx.is_main:
            if self.export is not None:
                summary["export"] = str(self.out_dir / "final")
                self.export(self.model, self.out_dir / "final")
            plot_run(self.metrics.path, self.out_dir)
        ctx.barrier()
        return summary
