"""The supervised training loop shared by pretraining and SFT.

One optimizer step = one global batch of `batch_size` sequences, split over processes (contiguous slices)
and micro-batches (gradient accumulation). Every loss term is divided by its count over the global batch
(target tokens, MTP target tokens, sequences) before backward, and gradients are summed over processes by
DistributedDataParallel (dist.py): the update is the same whatever the number of processes or micro-batches.
After the optimizer step the routing biases take their aux-loss-free step from the global per-expert loads.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from selfseek.models.model import CausalLM
from selfseek.train.balance import RouterMonitor, load_ratio
from selfseek.train.checkpoint import load_checkpoint_state, resolve_resume, save_checkpoint
from selfseek.train.config import LoopConfig, OptimConfig, TrainConfigError
from selfseek.train.data import Order, collate, micro_batches
from selfseek.train.dist import DistContext, gather_experts, my_experts, shard_experts
from selfseek.train.losses import lm_losses, target_counts
from selfseek.train.optim import clip_grads, lr_at, make_optimizer, set_lr
from selfseek.train.plots import MetricsLog, plot_run, truncate_metrics


class LossModel(nn.Module):
    """The model's summed losses (losses.lm_losses) as a module's forward, so that DistributedDataParallel sees
    the forward passes whose gradients it reduces. -> (main CE sum, MTP CE sum or None)."""

    def __init__(self, model: CausalLM):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, mtp: bool,
                doc_lens: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        ls = lm_losses(self.model, inputs, targets, mtp=mtp, doc_lens=doc_lens)
        return ls.lm, ls.mtp


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
        self.sharded = loop.fsdp and ctx.active
        if self.sharded:
            if loop.shard_optimizer:
                raise TrainConfigError("train.fsdp shards the optimizer state already: drop train.shard_optimizer")
            frozen = [n for n, p in model.named_parameters() if not p.requires_grad
                      and not n.endswith("e_score_correction_bias")]
            if frozen:
                raise TrainConfigError(f"train.fsdp is for full fine-tuning; {frozen[0]!r} is frozen (LoRA?)")
        self.expert_params: dict[str, nn.Parameter] = {}  # expert parallelism: this rank's experts
        if loop.expert_parallel and ctx.active:
            if loop.fsdp or loop.shard_optimizer:
                raise TrainConfigError("train.expert_parallel goes with plain DDP: drop train.fsdp / shard_optimizer")
            self.expert_params = shard_experts(model, ctx)
        self.loss_model = LossModel(model)
        if self.sharded:
            self.ddp = ctx.shard(self.loss_model, [*model.model.layers, *model.mtp])
        else:  # the training forward; DistributedDataParallel on several processes
            self.ddp = ctx.wrap(self.loss_model, [f"model.{n}" for n in self.expert_params])
        self.params = [p for p in model.parameters() if p.requires_grad]  # FSDP2 replaced them by sharded ones
        self.optimizer = self._make_optimizer(model, optim)
        self.monitor = RouterMonitor(model, seq_aux=loop.seq_aux_alpha > 0)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", enabled=ctx.is_main)
        self.step, self.position, self.tokens_seen = 0, 0, 0
        self.history: list[dict[str, Any]] = []  # every step's record, on every rank (tests read it)

    def _make_optimizer(self, model: CausalLM, optim: OptimConfig) -> torch.optim.Optimizer:
        """AdamW (optim.make_optimizer); with train.shard_optimizer on several processes, the same AdamW under
        ZeroRedundancyOptimizer: each process steps and keeps the state of its share of the parameters, then
        broadcasts them (ZeRO stage 1; the update is AdamW's, elementwise, so the result is the same)."""
        opt = make_optimizer(model, optim)
        if not (self.loop.shard_optimizer and self.ctx.active):
            return opt
        from torch.distributed.optim import ZeroRedundancyOptimizer  # imported when used: it scripts optimizers

        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups if g["params"]]
        return ZeroRedundancyOptimizer(groups, optimizer_class=type(opt),
                                       **{k: opt.defaults[k] for k in ("lr", "betas", "eps")})

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
        counts = torch.tensor([sum(target_counts(b[1])[i] for b in batches) for i in (0, 1)], dtype=torch.float64)
        n_lm, n_mtp = ctx.sum_(counts).tolist()
        n_seq = cfg.batch_size
        use_mtp = cfg.mtp_weight > 0 and len(self.model.mtp) > 0
        sums = torch.zeros(3, dtype=torch.float64)  # main CE, MTP CE, balance terms
        for j, (inputs, targets, *packed) in enumerate(batches):  # packed: a packed row's document lengths
            inputs, targets = inputs.to(dev), targets.to(dev)
            self.monitor.rows = inputs.shape[0]
            # gradients accumulate locally over micro-batches; DDP reduces them on the last one's backward
            with ctx.no_sync(self.ddp, sync=j == len(batches) - 1):
                with self._autocast():
                    lm, mtp = self.ddp(inputs, targets, use_mtp, packed[0] if packed else None)
                    bal = self.monitor.pop_loss()
                loss = lm / max(n_lm, 1)
                if mtp is not None:
                    loss = loss + cfg.mtp_weight * mtp / max(n_mtp, 1)
                if bal is not None:
                    loss = loss + cfg.seq_aux_alpha * bal / n_seq
                (loss * ctx.world).backward()  # DDP averages over processes: this makes it the global sum
            sums += torch.tensor([lm.item(), mtp.item() if mtp is not None else 0.0,
                                  bal.item() if bal is not None else 0.0], dtype=torch.float64)
        for p in self.expert_params.values():
            # each rank's experts got the gradients of every rank's tokens through the all-to-all's backward: the
            # world-size scaling of the loss is undone here (DDP does not average them). A zero gradient when no
            # token came, as one process gives the whole stack (AdamW then steps every expert alike).
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad.div_(ctx.world)
        if self.sharded or self.expert_params:
            grad_norm = self._clip_sharded()
        else:
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

    def _clip_sharded(self) -> float:
        """clip_grads when ranks hold different parameters (FSDP2's shards, expert parallelism's experts): the
        global norm sums every rank's share; gradients of replicated parameters count once."""
        mine = {id(p) for p in self.expert_params.values()}
        sq = torch.zeros(2, dtype=torch.float64)  # [per-rank share, replicated]
        grads = [p.grad for p in self.params if p.grad is not None]
        for p in self.params:
            if p.grad is not None:
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                sq[0 if self.sharded or id(p) in mine else 1] += g.double().square().sum().cpu()
        shared = sq[1].item()
        norm = (self.ctx.sum_(sq[:1]).item() + shared) ** 0.5
        max_norm = self.optim_cfg.grad_clip
        if max_norm > 0:
            coef = min(1.0, max_norm / (norm + 1e-6))  # as torch.nn.utils.clip_grad_norm_
            for g in grads:
                g.mul_(coef)
        return norm

    def _optimizer_index(self) -> dict[str, int]:
        """Expert parameter name -> its index in the optimizer's state dict."""
        index = {id(p): i for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
        return {n: index[id(p)] for n, p in self.expert_params.items()}

    def _full_states(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The whole model and optimizer state dicts when ranks hold parts (collective): FSDP2's gathered on rank 0
        (empty elsewhere), expert parallelism's on every rank."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        if self.expert_params:
            msd, osd = self.model.state_dict(), self.optimizer.state_dict()
            for n, i in self._optimizer_index().items():
                msd[n] = gather_experts(msd[n], self.ctx)
                for key in ("exp_avg", "exp_avg_sq"):
                    osd["state"][i][key] = gather_experts(osd["state"][i][key], self.ctx)
            return msd, osd

        msd, osd = get_state_dict(self.ddp, self.optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("model."): v for k, v in msd.items()}, osd

    def _load_full_states(self, model_state: dict[str, Any], optimizer_state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        if self.expert_params:
            for n, i in self._optimizer_index().items():
                model_state[n] = my_experts(model_state[n], self.ctx)
                for key in ("exp_avg", "exp_avg_sq"):
                    optimizer_state["state"][i][key] = my_experts(optimizer_state["state"][i][key], self.ctx)
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(optimizer_state)
            return

        set_state_dict(self.ddp, self.optimizer, model_state_dict={f"model.{k}": v for k, v in model_state.items()},
                       optim_state_dict=optimizer_state, options=StateDictOptions(full_state_dict=True))

    def _export_model(self) -> CausalLM:
        """The model to export: itself, or (FSDP2, collective) a whole copy on rank 0 from the gathered shards."""
        if not (self.sharded or self.expert_params):
            return self.model
        state, _ = self._full_states()
        if not self.ctx.is_main:
            return self.model
        whole = CausalLM(self.model.config)
        whole.load_state_dict(state)
        return whole

    # ---- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean next-token loss over the first eval_batches micro-batches of validation data."""
        if self.valid_data is None or len(self.valid_data) == 0:
            return None
        cfg, ctx = self.loop, self.ctx
        n = min(len(self.valid_data), cfg.eval_batches * cfg.micro_batch_size)
        mine = list(range(ctx.rank, n, ctx.world))
        m = cfg.micro_batch_size
        # FSDP2 gathers parameters in every forward: each rank runs as many as the busiest one (an idle one a
        # throw-away forward), with grad on so that no eval-time weight fusion touches its gathered weights
        busiest = -(-n // ctx.world)
        calls = -(-(busiest if self.sharded or self.expert_params else len(mine)) // m)
        sums = torch.zeros(2, dtype=torch.float64)
        self.model.eval()
        for j in range(calls):
            items = mine[j * m : (j + 1) * m]
            inputs, targets = collate([self.valid_data[i] for i in (items or [0])], self.pad_id)
            with self._autocast(), torch.set_grad_enabled(self.sharded):
                lm, _ = self.loss_model(inputs.to(ctx.device), targets.to(ctx.device), False)
            if items:
                sums += torch.tensor([lm.item(), target_counts(targets)[0]], dtype=torch.float64)
        self.model.train()
        ctx.sum_(sums)
        return sums[0].item() / max(sums[1].item(), 1)

    # ---- the loop -----------------------------------------------------------------------------------
    def counters(self) -> dict[str, Any]:
        return {"position": self.position, "tokens_seen": self.tokens_seen}

    def save(self) -> Path:
        if hasattr(self.optimizer, "consolidate_state_dict"):  # ZeRO
            self.optimizer.consolidate_state_dict(to=0)  # every rank sends its share; rank 0 writes the whole
        states = self._full_states() if self.sharded or self.expert_params else None
        path = save_checkpoint(self.out_dir, self.step, self.model, self.optimizer, self.counters(), self.job_config,
                               self.ctx.rank, self.loop.keep_checkpoints, states)
        self.ctx.barrier()
        return path

    def resume(self) -> None:
        path = resolve_resume(self.loop.resume, self.out_dir)
        if path is None:
            if self.ctx.is_main:
                truncate_metrics(self.metrics.path, 0)  # a fresh run: no records of an earlier one
            return
        c = load_checkpoint_state(path, self.model, self.optimizer, self.ctx.rank,
                                  self._load_full_states if self.sharded or self.expert_params else None)
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
        done = self.step >= cfg.steps
        whole = self._export_model() if done and self.export is not None else None  # collective under FSDP2
        if done and ctx.is_main:
            if self.export is not None:
                summary["export"] = str(self.out_dir / "final")
                self.export(whole, self.out_dir / "final")
            plot_run(self.metrics.path, self.out_dir)
        ctx.barrier()
        return summary
