"""DeepSeekMoE: shared experts plus fine-grained routed experts (V2 paper eq. 20, V3 paper eq. 12).

    h' = u + sum_i FFN_i^shared(u) + sum_i g_i FFN_i^routed(u)

Routing (`Gate`), with s the router scores of one token over E experts:
- greedy (V2-Lite):              s = softmax(z); top-K of s.
- group_limited_greedy (V2):     s = softmax(z); keep the topk_group groups with the largest max(s);
                                 top-K among their experts.
- noaux_tc (V3/R1/V3.1):         s = sigmoid(z); selection uses s + b (aux-loss-free bias), groups ranked
                                 by the sum of their two best biased scores; weights use the unbiased s.
Then optionally w /= sum(w) (norm_topk_prob) and w *= routed_scaling_factor.

Shape letters: n tokens, e experts, k experts per token, i expert width, m model width.
"""

from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from selfseek import kernels
from selfseek.config import ModelConfig
from selfseek.kernels import build
from selfseek.models.layers import MLP

_METHODS = {"greedy": 0, "group_limited_greedy": 1, "noaux_tc": 2}  # kernels/routing.cpp's codes
_SCORINGS = {"softmax": 0, "sigmoid": 1}


def _bind_routing(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
    lib.selfseek_gate.argtypes = [ptr, i64, i64, ptr, i32, ptr, i64, i32, i64, i64, i64, i32, ctypes.c_float, ptr, ptr]
    lib.selfseek_gate.restype = ctypes.c_int32
    return lib


def routing_library() -> ctypes.CDLL | None:
    """kernels/routing.cpp for this CPU, or None (no compiler, SELFSEEK_NO_KERNELS)."""
    return build.load("routing", _bind_routing)


@functools.cache
def _expert_pool(threads: int) -> ThreadPoolExecutor:
    """Workers for MoE prefill's expert GEMMs (torch and the kernels release the GIL while they compute)."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="selfseek-experts")


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_experts = cfg.num_experts_per_tok, cfg.n_routed_experts
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.method, self.scoring = cfg.topk_method, cfg.scoring_func
        self.norm_topk_prob, self.route_scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        # Router and bias stay fp32 whatever the compute dtype: near-ties must not flip experts.
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size, dtype=torch.float32))
        if self.method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(
                torch.zeros(self.n_experts, dtype=torch.float32), requires_grad=False
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, m] -> (weights [n, k] fp32, expert ids [n, k])."""
        if (routed := self._forward_native(x)) is not None:
            return routed
        # As few ops as the math allows: no no-op casts, no group mask to invert.
        w = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        logits = F.linear(x if x.dtype == torch.float32 else x.float(), w)
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        n = scores.shape[0]
        if self.method == "greedy":
            weights, ids = scores.topk(self.top_k, dim=-1, sorted=False)
        else:
            choice = scores + self.e_score_correction_bias if self.method == "noaux_tc" else scores
            if self.topk_group < self.n_group:  # else every group is kept: nothing to mask
                grouped = choice.view(n, self.n_group, -1)
                if self.method == "noaux_tc":
                    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
                else:
                    group_scores = grouped.amax(dim=-1)
                keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
                dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
                choice = grouped.masked_fill(dropped[..., None], float("-inf")).view(n, -1)
            ids = choice.topk(self.top_k, dim=-1, sorted=False).indices
            weights = scores.gather(1, ids)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, ids

    def native_args(self) -> tuple | None:
        """selfseek_gate's arguments after x's (weight, scoring, bias, experts, method, groups, top_k, norm, scale),
        or None where the kernel cannot read this router (not fp32 contiguous CPU tensors, an unknown method)."""
        bias = self.e_score_correction_bias if self.method == "noaux_tc" else None
        if self.method not in _METHODS or self.scoring not in _SCORINGS or any(
                t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()
                for t in (self.weight, bias) if t is not None):
            return None
        return (self.weight.data_ptr(), _SCORINGS[self.scoring], None if bias is None else bias.data_ptr(),
                self.n_experts, _METHODS[self.method], self.n_group or 1, self.topk_group or 1, self.top_k,
                int(bool(self.norm_topk_prob)), float(self.route_scale))

    def _forward_native(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """forward() in one kernel call (kernels/routing.cpp's selfseek_gate, which the native decode step calls
        too), or None where the torch ops run: no kernels, another device, or autograd recording (the router
        trains). Its logits are its own fixed-order sums, not torch's product, so a near tie may pick another
        expert than the torch ops would (fp32 rounding); the experts come best first, where torch's unsorted top-k
        leaves an order of its own (their sum adds in another order)."""
        if x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != self.weight.shape[1] or (
                torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return None
        if (lib := routing_library()) is None or (args := self.native_args()) is None:
            return None
        x = x.float().contiguous()
        n = x.shape[0]
        weights, ids = torch.empty(n, self.top_k), torch.empty(n, self.top_k, dtype=torch.int64)
        if lib.selfseek_gate(x.data_ptr(), n, x.shape[1], *args, weights.data_ptr(), ids.data_ptr()) != 0:
            raise ValueError(f"routing kernel rejected the gate's config (method {self.method}, {self.n_experts} "
                             f"experts, n_group {self.n_group}, topk_group {self.topk_group}, top_k {self.top_k})")
        return weights, ids


def records_grad(x: torch.Tensor, stacks: list[kernels.Weight]) -> bool:
    """Whether autograd records through these activations or float expert stacks (training a router or experts)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(
        isinstance(s, torch.Tensor) and s.requires_grad for s in stacks))


def fused_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, stacks: list[kernels.Weight],
                  limit: float = 0.0) -> torch.Tensor | None:
    """Routed experts in one call of the fused kernel (kernels/quant.cpp; `limit`: DeepSeek-V4's swiglu_limit), in
    x's dtype; None where it cannot run (autograd records, another device, no kernels): the caller's torch paths."""
    if records_grad(x, stacks) or not kernels.moe_native(x, *stacks):
        return None
    y = kernels.moe(x, weights, ids, *stacks, limit=limit)  # fp32
    return y if y.dtype == x.dtype else y.to(x.dtype)


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: gate/up [e, i, m], down [e, m, i]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, i, m = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.n_experts = e
        self.gate_proj = nn.Parameter(torch.empty(e, i, m))
        self.up_proj = nn.Parameter(torch.empty(e, i, m))
        self.down_proj = nn.Parameter(torch.empty(e, m, i))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """y[n] = sum_k w[n,k] FFN_{ids[n,k]}(x[n]), each expert run once on the tokens routed to it."""
        stacks = [self._stack(p) for p in ("gate_proj", "up_proj", "down_proj")]
        if (x.shape[0] >= kernels.GEMM_MIN_ROWS and x.dtype == torch.float32 and not isinstance(stacks[0], torch.Tensor)
                and not records_grad(x, stacks) and kernels.moe_native(x, *stacks)
                and not all(kernels.gemm_by_panels(st) or kernels.takes_int8(st, x.shape[0]) for st in stacks)):
            return self._forward_prefill(x, weights, ids, stacks)
        if (y := fused_experts(x, weights, ids, stacks)) is not None:
            return y
        if not records_grad(x, stacks) and _grouped_mm_runs(x, stacks):
            return self._forward_grouped(x, weights, ids)
        return self._forward_torch(x, weights, ids)

    # From this many tokens on, an expert's tokens are multiplied by its dequantized weights with torch's GEMM. Below
    # it the fused kernel's weight panels (6+ rows) beat dequantizing the expert and MKL's packing for so few rows:
    # the medium V3's 512-token prefill spent 559 ms in the experts with 16 here, 527 / 503 / 551 ms with 48 / 64 /
    # 96 (2 threads; 864 -> 829 ms at 1 thread with 64); with every expert fused, the large ones lost again.
    GEMM_MIN_TOKENS = 64

    def _forward_prefill(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                         stacks: list[kernels.Weight]) -> torch.Tensor:
        """Many tokens (prefill) with packed stacks on the CPU: experts with at least GEMM_MIN_TOKENS tokens through
        their dequantized weights and torch's GEMM, the rest as (token, expert) pairs through the fused kernel.
        With several threads the GEMM experts run side by side, one thread each (_expert_pool): a layer's GEMMs are
        small (tens of tokens x 1024 x 512 on the medium V3), and one GEMM split over threads spends much of its time
        in their barriers. Outputs are added in expert order either way."""
        k = ids.shape[1]
        flat_w = weights.flatten().float()
        y = torch.zeros_like(x)
        few, many = [], []
        for e, slots in _slots_by_expert(ids, self.n_experts):
            (few if len(slots) < self.GEMM_MIN_TOKENS else many).append((e, slots))
        threads = torch.get_num_threads()
        if threads > 1 and len(many) > 1:
            def one_thread(item: tuple[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
                torch.set_num_threads(1)  # OpenMP's thread count is per calling thread: the worker's own
                return self._expert_gemm(x, k, flat_w, *item)

            torch.set_num_threads(1)  # torch's and MKL's global count, for the workers' GEMMs
            try:
                outs = list(_expert_pool(threads).map(one_thread, many))
            finally:
                torch.set_num_threads(threads)
        else:
            outs = [self._expert_gemm(x, k, flat_w, e, slots) for e, slots in many]
        for tokens, out in outs:
            y.index_add_(0, tokens, out)
        if few:
            slots = torch.cat([slots for _, slots in few])
            tokens = slots // k
            y.index_add_(0, tokens, kernels.moe(x[tokens], flat_w[slots, None], ids.flatten()[slots, None], *stacks))
        return y

    def _expert_gemm(self, x: torch.Tensor, k: int, flat_w: torch.Tensor, e: int,
                     slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e on the tokens of its slots through its dequantized weights: (tokens, weighted outputs)."""
        inter = self.down_proj.in_features
        gate_up, down = torch.empty(2 * inter, x.shape[1]), torch.empty(x.shape[1], inter)
        kernels.to_float(self.gate_proj.expert(e), gate_up[:inter])
        kernels.to_float(self.up_proj.expert(e), gate_up[inter:])
        kernels.to_float(self.down_proj.expert(e), down)
        tokens = slots // k
        h = x[tokens] @ gate_up.T  # gate and up in one GEMM
        h = F.silu(h[:, :inter]) * h[:, inter:]
        return tokens, (h @ down.T) * flat_w[slots, None]

    def _forward_grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The same math without a host sync, for float stacks where the native kernels do not run (CUDA; bf16 there):
        slots sorted by expert, one grouped GEMM per projection over the experts' consecutive row ranges
        (torch._grouped_mm), weighted scatter-add. Counts by scatter_add, not bincount (which syncs on CUDA)."""
        k = ids.shape[1]
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)
        counts = torch.zeros(self.n_experts, dtype=torch.int64, device=ids.device)
        ends = counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids)).cumsum(0).to(torch.int32)
        tokens = order // k
        h = x[tokens]
        h = F.silu(torch._grouped_mm(h, self.gate_proj.transpose(1, 2), offs=ends)) * torch._grouped_mm(
            h, self.up_proj.transpose(1, 2), offs=ends)
        out = torch._grouped_mm(h, self.down_proj.transpose(1, 2), offs=ends) * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, tokens, out.to(x.dtype))

    def _forward_torch(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The same math in torch (CUDA, training, no native kernels): one host sync for the expert counts."""
        k = ids.shape[1]
        flat_w = weights.flatten()
        y = torch.zeros_like(x)
        for e, slots in _slots_by_expert(ids, self.n_experts):
            tokens = slots // k
            h = x[tokens]
            h = F.silu(self._linear("gate_proj", e, h)) * self._linear("up_proj", e, h)
            out = self._linear("down_proj", e, h) * flat_w[slots, None]
            y.index_add_(0, tokens, out.to(y.dtype))
        return y

    def _stack(self, proj: str) -> kernels.Weight:
        w = getattr(self, proj)
        return w if isinstance(w, torch.Tensor) else w.packed  # a QuantStack (models/quant.py)

    def _linear(self, proj: str, e: int, h: torch.Tensor) -> torch.Tensor:
        w = getattr(self, proj)
        if isinstance(w, torch.Tensor):
            return h @ w[e].to(h.dtype).T
        return w.linear(e, h)  # a QuantStack (models/quant.py)


def _slots_by_expert(ids: torch.Tensor, n_experts: int):
    """(expert, its token-choice slots into ids.flatten()) for each expert with tokens, ascending: one host sync."""
    flat_ids = ids.flatten()
    order = flat_ids.argsort(stable=True)  # slots grouped by expert
    start = 0
    for e, count in enumerate(torch.bincount(flat_ids, minlength=n_experts).tolist()):
        if count:
            yield e, order[start : start + count]
        start += count


_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_runs(x: torch.Tensor, stacks: list) -> bool:
    """Whether torch._grouped_mm serves these float stacks (same dtype as x): probed once per device type and dtype,
    as its support varies with the torch version and the GPU (CUDA: bf16 on recent GPUs)."""
    if not hasattr(torch, "_grouped_mm") or not all(isinstance(s, torch.Tensor) and s.dtype == x.dtype for s in stacks):
        return False
    key = (x.device.type, x.dtype)
    if key not in _GROUPED_OK:
        a, b = torch.ones(4, 16, dtype=x.dtype, device=x.device), torch.ones(2, 16, 16, dtype=x.dtype, device=x.device)
        try:
            got = torch._grouped_mm(a, b, offs=torch.tensor([1, 4], dtype=torch.int32, device=x.device))
            _GROUPED_OK[key] = bool((got == 16).all())
        except (RuntimeError, NotImplementedError):
            _GROUPED_OK[key] = False
    return _GROUPED_OK[key]


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x if x.dim() == 2 else x.reshape(-1, shape[-1])
        weights, ids = self.gate(flat)
        y = self.experts(flat, weights, ids)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y if x.dim() == 2 else y.view(shape)
