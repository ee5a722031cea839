"""Expert parallelism: the routed experts of every MoE layer partitioned across E ranks, tokens sent to the ranks
that own their experts and the results sent back (all-to-all dispatch and combine, DeepSeek-V3 §3.4).

`dispatch_combine` is the one implementation, a plain function of (tokens, routing, this rank's Experts): the
serving model's EPMoE calls it, and so can an expert-parallel training step (it is differentiable: with grad on the
all-to-alls are torch.distributed.nn's autograd ones). Routing is whatever the Gate chose (softmax greedy, group
limited, or V3's aux-loss-free sigmoid with its bias): it runs on the sending rank, replicated router weights. Each
rank's Experts module holds only its own experts (float or quantized stacks alike) and runs them with its usual
kernels on the rows it received.
"""

from __future__ import annotations

import torch
from torch import nn

from selfseek.distributed import comm as comm_mod
from selfseek.models.moe import Experts, MoE
from selfseek.models.quant import QuantStack


def partition_experts(experts: Experts, rank: int, ep: int) -> range:
    """Shrink `experts` (on the meta device) to rank's contiguous share of them: -> their global ids."""
    n = experts.n_experts
    if n % ep:
        raise ValueError(f"n_routed_experts = {n} is not divisible by expert_parallel_size {ep}")
    local = n // ep
    for proj in ("gate_proj", "up_proj", "down_proj"):
        w = getattr(experts, proj)
        delattr(experts, proj)
        if isinstance(w, QuantStack):
            setattr(experts, proj, QuantStack(local, w.in_features, w.out_features, w.bits))
        else:
            setattr(experts, proj, nn.Parameter(torch.empty(local, *w.shape[1:], dtype=w.dtype, device="meta"),
                                                requires_grad=False))
    experts.n_experts = local
    experts.first_expert = rank * local
    return range(rank * local, (rank + 1) * local)


def dispatch_combine(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: Experts,
                     comm: comm_mod.Comm | None = None) -> torch.Tensor:
    """y[n] = sum_k weights[n, k] FFN_{ids[n, k]}(x[n]) with the experts spread over the ranks.

    x [n, m] this rank's tokens, weights [n, k], ids [n, k] global expert ids; `experts` holds experts
    [first_expert, first_expert + n_experts) of every rank's equal share. Each (token, expert) slot is one row sent
    to the expert's rank (dispatch), run there, and sent back (combine), where the weighted rows are summed."""
    comm = comm or comm_mod.current()
    n, k = ids.shape
    per_rank = experts.n_experts
    flat_ids = ids.reshape(-1)
    dest = flat_ids // per_rank
    order = dest.argsort(stable=True)  # slots grouped by destination rank
    send = torch.bincount(dest, minlength=comm.world)
    recv = comm.exchange_counts(send)
    send_counts, recv_counts = send.tolist(), recv.tolist()
    tokens = order // k
    rows = comm.all_to_all(x[tokens], send_counts, recv_counts)
    local_ids = comm.all_to_all((flat_ids[order] - dest[order] * per_rank)[:, None], send_counts, recv_counts)
    if rows.shape[0]:
        out = experts(rows, torch.ones(rows.shape[0], 1, dtype=torch.float32, device=x.device), local_ids)
    else:
        out = rows
    back = comm.all_to_all(out, recv_counts, send_counts)
    weighted = back * weights.reshape(-1)[order, None].to(back.dtype)
    return torch.zeros_like(x).index_add(0, tokens, weighted.to(x.dtype))


class EPMoE(MoE):
    """DeepSeekMoE with its routed experts spread over the ranks (shared experts local, whole on every rank).

    Every rank holds the same tokens here (attention is replicated or tensor-parallel), so each routes and
    dispatches only its own contiguous chunk of them, and the chunks' outputs are gathered back: each token's
    experts run once in the whole group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        comm = comm_mod.current()
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        n = flat.shape[0]
        chunk = -(-n // comm.world)
        y = self.route_and_dispatch(flat[comm.rank * chunk : (comm.rank + 1) * chunk], comm)
        if y.shape[0] < chunk:  # the last ranks' chunks may be short or empty: gathered at one size
            y = torch.cat([y, y.new_zeros(chunk - y.shape[0], y.shape[1])])
        return comm.all_gather(y, dim=0)[:n].view(shape)

    def route_and_dispatch(self, rows: torch.Tensor, comm: comm_mod.Comm) -> torch.Tensor:
        """The MoE output of `rows` [n, m] (this rank's to route; n may be 0: the rank still takes part in the
        exchanges): routed experts through dispatch_combine, shared experts here."""
        if rows.shape[0]:
            weights, ids = self.gate(rows)
        else:
            k = self.gate.top_k
            weights, ids = rows.new_zeros(0, k, dtype=torch.float32), torch.zeros(0, k, dtype=torch.long)
        y = dispatch_combine(rows, weights, ids.to(rows.device), self.experts, comm)
        if self.shared_experts is not None and rows.shape[0]:
            y = y + self.shared_experts(rows)
        return y
