"""Data parallelism through torch.distributed, set up by torchrun's environment (RANK, WORLD_SIZE, ...).

Gradients are reduced by DistributedDataParallel (gloo on CPU, NCCL on GPU). Each process divides its loss
by the token count of the *global* batch and scales it by the world size, which DDP's average divides back
out: the reduced gradient is the gradient of the global mean, exactly what one process computes over the
same batch (the scaling by a power of two is exact in floating point).

Memory beyond plain DDP (trainer.py): `train.shard_optimizer` keeps each process's share of the AdamW state
(ZeRO-1, torch's ZeroRedundancyOptimizer); `train.fsdp` shards parameters, gradients and AdamW state with
FSDP2 (`fully_shard` per decoder layer, then the rest), which runs on gloo/CPU as well as NCCL/CUDA in torch
2.13; both give the weights of one process (tests/test_train_dist.py).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from selfseek.models.moe import Experts, MoE
from selfseek.train.config import TrainConfigError


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce SUM in place (a no-op on one process)."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def wrap(self, module: nn.Module, own: list[str] = ()) -> nn.Module:
        """`module` under DistributedDataParallel when there are several processes (itself otherwise).

        find_unused_parameters: a step may leave parameters out of the graph (the MTP module with its loss
        off, experts no token was routed to). Buffers are not re-broadcast every forward: the ranks start
        from rank 0's parameters and buffers (DDP's construction) and stay equal by construction. `own`: names
        of parameters each rank keeps its own (expert parallelism's experts), left out of the reduction."""
        if not self.active:
            return module
        if own:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, list(own))
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True,
                                       forward_sync_buffers=False)

    def shard(self, module: nn.Module, blocks: list[nn.Module]) -> nn.Module:
        """FSDP2 (fully_shard) over the processes: each of `blocks` (decoder layers) and then `module` (the rest)
        keep 1/world of their trainable parameters, gradients and optimizer state, gathered for their forward
        and backward. Frozen parameters (the aux-loss-free routing bias, updated by its own rule) stay whole.
        Gradients are averaged like DDP's (the world-size scaling of the loss applies the same way)."""
        if not self.active:
            return module
        from torch.distributed.fsdp import fully_shard

        frozen = {p for p in module.parameters() if not p.requires_grad}
        for block in blocks:
            fully_shard(block, ignored_params=frozen)
        return fully_shard(module, ignored_params=frozen)

    def no_sync(self, wrapped: nn.Module, sync: bool):
        """Within it, backward passes accumulate locally (gradient accumulation over micro-batches); gradients
        are reduced on the backward that runs with sync=True."""
        if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
            wrapped.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        if sync or not isinstance(wrapped, DistributedDataParallel):
            return contextlib.nullcontext()
        return wrapped.no_sync()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


EXPERT_STACKS = ("gate_proj", "up_proj", "down_proj")


class ExpertParallelMoE(MoE):
    """DeepSeekMoE in expert-parallel training: each rank routes its own (data-parallel) tokens and
    distributed.expert_parallel.dispatch_combine (the serving path's one implementation, differentiable)
    runs every (token, expert) pair on the rank that owns the expert; shared experts run locally."""

    comm = None  # set by shard_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from selfseek.distributed.expert_parallel import dispatch_combine

        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids = self.gate(flat)
        y = dispatch_combine(flat, weights, ids.to(flat.device), self.experts, self.comm)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(shape)


def shard_experts(model: nn.Module, ctx: DistContext) -> dict[str, nn.Parameter]:
    """Keep this rank's contiguous 1/world share of every MoE layer's routed experts (expert parallelism);
    -> those parameters by name. They are this rank's alone: never averaged by DDP."""
    from selfseek.distributed.comm import Comm

    comm = Comm(ctx.rank, ctx.world, ctx.device)
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, MoE):
            continue
        ex = m.experts
        if type(ex) is not Experts or not all(isinstance(getattr(ex, p), nn.Parameter) for p in EXPERT_STACKS):
            raise TrainConfigError(f"train.expert_parallel: {name}.experts are adapted or quantized; it splits float "
                                   "expert stacks only (full fine-tuning, or LoRA without lora.experts)")
        if ex.n_experts % ctx.world:
            raise TrainConfigError(f"train.expert_parallel: {ex.n_experts} routed experts do not split over "
                                   f"{ctx.world} processes")
        per = ex.n_experts // ctx.world
        first = ctx.rank * per
        for proj in EXPERT_STACKS:
            w = getattr(ex, proj)
            delattr(ex, proj)
            local = nn.Parameter(w.detach()[first : first + per].clone(), requires_grad=w.requires_grad)
            setattr(ex, proj, local)
            out[f"{name}.experts.{proj}"] = local
        ex.n_experts, ex.first_expert = per, first
        m.__class__, m.comm = ExpertParallelMoE, comm
    return out


def gather_experts(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Every rank's share of an expert stack (or of its optimizer state) -> the whole stack, on every rank."""
    parts = [torch.empty_like(t) for _ in range(ctx.world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def my_experts(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's share of a whole expert stack."""
    per = t.shape[0] // ctx.world
    return t[ctx.rank * per : (ctx.rank + 1) * per].clone()


def init_distributed(device: str = "auto") -> DistContext:
    """One process: a plain context. Under torchrun: join the group (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device if device not in ("auto",) else "cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return DistContext(rank=rank, world=world, local_rank=local_rank, device=dev)
