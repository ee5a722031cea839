"""The collectives every parallel layer uses, on torch.distributed (gloo on CPUs, NCCL on GPUs), each with a
timeout and a byte counter.

`init` joins the default group (waiting up to JOIN_TIMEOUT_S for every rank to start) and makes three more: the
compute collectives (all-reduce, all-gather, all-to-all) run on one with `timeout` seconds each; the lockstep
commands (launch.py) on a gloo group with a long timeout, because workers wait on it while the server is idle; a
third gloo group answers "which rank is missing" (monitored_barrier) after a failure.

Bytes are counted per rank as what this rank puts on the wire under the usual algorithms: a ring all-reduce of B
bytes sends 2 (W-1)/W B, an all-gather of B local bytes (W-1) B, an all-to-all the rows it sends to other ranks,
a broadcast (W-1) B from the root, a gather to rank 0 the B bytes each other rank sends; plan.py predicts the
same quantities from a config.
"""

from __future__ import annotations

import datetime
import math
import os
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0
JOIN_TIMEOUT_S = 600.0  # every rank must have started and joined within this
COMMAND_TIMEOUT_S = 7 * 24 * 3600.0  # workers wait this long for the next step (an idle server)


class RankFailure(RuntimeError):
    """A collective failed or timed out: a rank died, hung or raised. The message names the rank when known."""


@dataclass
class Comm:
    """This process's place in the group and the byte counters of its collectives."""

    rank: int
    world: int
    device: torch.device
    timeout_s: float = DEFAULT_TIMEOUT_S
    compute: object = None  # the group of the layers' collectives (bounded by timeout_s)
    control: object = None  # the gloo group of lockstep commands
    health: object = None  # the gloo group of monitored barriers
    sent: Counter = field(default_factory=Counter)  # collective kind -> bytes this rank sent
    calls: Counter = field(default_factory=Counter)

    @property
    def active(self) -> bool:
        return self.world > 1

    def reset_counters(self) -> None:
        self.sent.clear()
        self.calls.clear()

    def _count(self, kind: str, nbytes: float) -> None:
        self.sent[kind] += nbytes
        self.calls[kind] += 1

    # ---- collectives --------------------------------------------------------------------------------
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over all ranks, in place (the partial outputs of row-parallel layers)."""
        if not self.active:
            return t
        self._count("all_reduce", 2 * (self.world - 1) / self.world * t.numel() * t.element_size())
        _run(dist.all_reduce, t, group=self.compute)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `t` (all the same shape) concatenated along `dim`."""
        if not self.active:
            return t
        t = t.contiguous()
        self._count("all_gather", (self.world - 1) * t.numel() * t.element_size())
        parts = [torch.empty_like(t) for _ in range(self.world)]
        _run(dist.all_gather, parts, t, group=self.compute)
        return torch.cat(parts, dim=dim)

    def all_to_all(self, t: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Rows of `t` (grouped by destination rank, send_counts[r] rows for rank r) exchanged: -> the
        recv_counts[r] rows each rank r sent here, in rank order. Differentiable when grad is on (training)."""
        if not self.active:
            return t
        row = math.prod(t.shape[1:]) * t.element_size()
        self._count("all_to_all", row * (sum(send_counts) - send_counts[self.rank]))
        t = t.contiguous()
        if torch.is_grad_enabled() and t.requires_grad:
            from torch.distributed.nn.functional import all_to_all_single

            out = torch.empty(sum(recv_counts), *t.shape[1:], dtype=t.dtype, device=t.device)
            return _run(all_to_all_single, out, t, recv_counts, send_counts, group=self.compute)
        out = t.new_empty(sum(recv_counts), *t.shape[1:])
        _run(dist.all_to_all_single, out, t, recv_counts, send_counts, group=self.compute)
        return out

    def exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        """send_counts [W] int64 (rows for each rank) -> recv_counts [W] (rows each rank sends here)."""
        if not self.active:
            return send_counts
        out = torch.empty_like(send_counts)
        self._count("all_to_all", send_counts.element_size() * (self.world - 1))
        _run(dist.all_to_all_single, out, send_counts.contiguous(), group=self.compute)
        return out

    def gather_rows(self, t: torch.Tensor, counts: list[int]) -> torch.Tensor | None:
        """Every rank's rows (counts[r] of them on rank r, the same trailing shape) concatenated in rank order on
        rank 0 (-> that tensor; None on the other ranks). Sent padded to max(counts) rows: one gather call."""
        if not self.active:
            return t
        width = max(counts)
        if width == 0:
            return t if self.rank == 0 else None
        padded = t.new_zeros(width, *t.shape[1:])
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == 0 else None
        if self.rank:
            self._count("gather", padded.numel() * padded.element_size())
        _run(dist.gather, padded.contiguous(), parts, dst=0, group=self.compute)
        if self.rank:
            return None
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])

    def broadcast_command(self, obj: object) -> object:
        """Rank 0's `obj` (pickled) to every rank, on the command group: -> the object."""
        box = [obj]
        _run(dist.broadcast_object_list, box, src=0, group=self.control)
        return box[0]

    def missing_ranks(self, timeout_s: float = 5.0) -> str:
        """After a failure: which ranks no longer answer, from a monitored barrier on the health group."""
        try:
            dist.monitored_barrier(group=self.health, timeout=datetime.timedelta(seconds=timeout_s),
                                   wait_all_ranks=True)
        except Exception as e:  # noqa: BLE001 - its message is the answer
            return str(e).splitlines()[0]
        return "every rank answers"


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RankFailure:
        raise
    except (RuntimeError, ValueError, OSError) as e:  # DistBackendError, gloo timeouts, closed connections
        raise RankFailure(f"{fn.__name__} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


_comm: Comm | None = None


def current() -> Comm | None:
    """The Comm of this process (None before `init` or after `shutdown`)."""
    return _comm


def init(rank: int, world: int, master_addr: str, master_port: int, device: torch.device,
         timeout_s: float | None = None, init_method: str | None = None) -> Comm:
    """Join the group: NCCL for CUDA devices, gloo otherwise; every collective bounded by timeout_s seconds
    (SELFSEEK_DIST_TIMEOUT, default 60). init_method "env://" under torchrun (its agent owns the store)."""
    global _comm
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process: one parallel model at a time")
    timeout_s = float(timeout_s or os.environ.get("SELFSEEK_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    backend = "nccl" if device.type == "cuda" else "gloo"
    # joining waits for every rank to start (seconds to minutes); the layers' collectives get timeout_s each
    dist.init_process_group(backend, init_method=init_method or f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=max(JOIN_TIMEOUT_S, timeout_s)))
    compute = dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    # the workers wait for rank 0's next command as long as the server idles; rank 0's sends stay bounded
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=COMMAND_TIMEOUT_S if rank else
                                                                        timeout_s))
    health = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    _comm = Comm(rank, world, device, timeout_s, compute, control, health)
    return _comm


def shutdown() -> None:
    global _comm
    _comm = None
    if dist.is_initialized():
        dist.destroy_process_group()
