"""Expert load balancing for DeepSeekMoE training (V3 paper §2.1.2, eq. 16-20).

Aux-loss-free: routing selects experts by s + b; after each optimizer step every bias moves by gamma
toward balance, b_i <- b_i + gamma * sign(mean_load - load_i), load_i = tokens routed to expert i over
the whole (global) batch. The bias gets no gradient.

Complementary sequence-wise balance loss, per MoE layer and sequence of T tokens:
    f_i = E / (K T) * sum_t 1(s_{i,t} in TopK_j(s_{j,t}, K)),   P_i = 1/T sum_t s_{i,t} / sum_j s_{j,t}
    L_Bal = alpha * sum_i f_i P_i
f counts the plain top-K of the affinities s as eq. 18 writes it (no bias, no group limit); it carries no
gradient, P does.

Both need what the router saw, so `RouterMonitor` puts a forward hook on every MoE layer (the MTP
module's too) while the model trains: the models/ code stays inference code. The hook re-runs the router
on the layer's input (a [tokens, m] matmul, small next to the experts) for the ids and the scores with
gradient. MoE layers see the batch flattened, so the trainer tells the monitor how many equal-length rows
it holds (`rows`) to cut it back into sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from selfseek.models.moe import MoE


def bias_update(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> None:
    """In place: b_i += gamma * sign(mean(load) - load_i) (overloaded experts down, underloaded up)."""
    load = load.to(bias.device, torch.float32)
    bias.add_(gamma * torch.sign(load.mean() - load))


def router_scores(moe: MoE, flat: torch.Tensor) -> torch.Tensor:
    """The affinities s [n, e] of tokens flat [n, m], with gradient (sigmoid for V3, softmax for V2)."""
    logits = F.linear(flat.float(), moe.gate.weight.float())
    return logits.sigmoid() if moe.gate.scoring == "sigmoid" else logits.softmax(dim=-1)


def sequence_balance_loss(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """scores [b, t, e] -> sum over the b sequences of sum_i f_i P_i (eq. 17-20 without alpha)."""
    b, t, e = scores.shape
    chosen = scores.detach().topk(top_k, dim=-1).indices.view(b, t * top_k)
    f = torch.zeros(b, e, device=scores.device).scatter_add_(1, chosen, torch.ones_like(chosen, dtype=torch.float32))
    f = f * (e / (top_k * t))
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
    return (f * p).sum()


class RouterMonitor:
    """Per-expert token counts and the sequence-wise balance loss of every MoE layer while training."""

    def __init__(self, model: nn.Module, seq_aux: bool):
        self.seq_aux = seq_aux
        self.layers: dict[str, MoE] = {}
        for name, module in model.named_modules():
            if isinstance(module, MoE):
                label = name.replace("model.layers.", "layer").replace(".mlp", "").replace("mtp.", "mtp")
                self.layers[label.replace(".block", "")] = module
        self.counts = {k: torch.zeros(m.gate.n_experts, dtype=torch.long) for k, m in self.layers.items()}
        self.rows = 1  # sequences in the coming forward: MoE layers see them flattened to [rows * tokens, m]
        self._loss: list[torch.Tensor] = []
        self._handles = [m.register_forward_hook(self._hook(k)) for k, m in self.layers.items()]

    def _hook(self, label: str):
        def hook(moe: MoE, args, output):
            if not moe.training:
                return
            x = args[0]
            flat = x.reshape(-1, x.shape[-1])
            with torch.no_grad():
                _, ids = moe.gate(flat)  # the same choice the layer just made
            self.counts[label] += torch.bincount(ids.flatten(), minlength=moe.gate.n_experts).cpu()
            if self.seq_aux and torch.is_grad_enabled():
                scores = router_scores(moe, flat)
                self._loss.append(sequence_balance_loss(scores.view(self.rows, -1, scores.shape[-1]), moe.gate.top_k))

        return hook

    def pop_loss(self) -> torch.Tensor | None:
        """Sum over layers and sequences of the balance terms of the forwards since the last call."""
        loss = torch.stack(self._loss).sum() if self._loss else None
        self._loss = []
        return loss

    def take_counts(self) -> dict[str, torch.Tensor]:
        counts = self.counts
        self.counts = {k: torch.zeros_like(v) for k, v in counts.items()}
        return counts

    def update_biases(self, counts: dict[str, torch.Tensor], gamma: float) -> None:
        """The aux-loss-free step, on gates that have a bias (noaux_tc); `counts` are global loads."""
        with torch.no_grad():
            for k, m in self.layers.items():
                bias = getattr(m.gate, "e_score_correction_bias", None)
                if bias is not None and gamma:
                    bias_update(bias, counts[k], gamma)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def load_ratio(counts: torch.Tensor) -> float:
    """max / mean tokens per expert (1.0 = perfectly balanced, E/K = everything on K experts)."""
    c = counts.float()
    return (c.max() / c.mean()).item() if c.sum() > 0 else 0.0
