"""Tensor parallelism by module surgery on the empty (meta) model, before any weight is loaded.

`Sharding.apply(model)` gives each layer this rank's part and makes the model carry `model.shard`, which the
safetensors loader asks (`owns`, `narrow`) so each rank reads only its slice of every tensor:

- attention: heads split. GQA: q/k/v column-parallel (rows of whole heads), o_proj row-parallel. MLA: q_proj /
  q_b_proj and kv_b_proj column-parallel by heads, q_a/kv_a projections and their norms replicated (the latent
  cache is the same on every rank), o_proj row-parallel.
- dense MLP (and the shared experts of a tensor-parallel MoE): gate/up column-parallel, down row-parallel.
- MoE with E = 1: every expert's intermediate split like a dense MLP; with E > 1, expert_parallel.py.
- embedding and lm_head vocab-parallel (rows [r V', (r+1) V'), V' = ceil(V / T), zero-padded).
A row-parallel layer's output is partial: one all-reduce per attention block and per MLP/MoE block, done by the
block's class (swapped in place, so module and parameter names stay the checkpoint's). Biases of row-parallel
layers are kept on rank 0 only (zeros elsewhere) so the sum adds them once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfseek.distributed import comm as comm_mod
from selfseek.models.attention import Attention
from selfseek.models.layers import MLP
from selfseek.models.mla import MLA
from selfseek.models.moe import Experts, MoE
from selfseek.models.quant import GROUP, HalfLinear, QuantEmbedding, QuantLinear, QuantStack, register_16bit_storage


@dataclass(frozen=True)
class Layout:
    """How a run is split: T tensor-parallel ranks, E expert-parallel ranks, D data-parallel attention groups, on
    `nnodes` machines. World = max(T x D, E); attention is split T ways within each of D groups, MoE layers E
    ways across the world (E = 1: the MoE is tensor-parallel like a dense MLP). D > 1 (data_parallel.py) runs
    with T = 1: each rank is one DP group, its own sequences and KV cache."""

    tp: int = 1
    ep: int = 1
    dp: int = 1
    nnodes: int = 1

    @property
    def world(self) -> int:
        return max(self.tp * self.dp, self.ep)

    def check(self) -> None:
        for name, v in (("tensor_parallel_size", self.tp), ("expert_parallel_size", self.ep),
                        ("data_parallel_size", self.dp), ("nnodes", self.nnodes)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.ep > 1 and self.ep != self.tp * self.dp and not (self.tp == 1 and self.dp == 1):
            raise ValueError(f"expert_parallel_size {self.ep} must equal tensor x data parallel size "
                             f"{self.tp * self.dp} (or be the only parallel dimension)")
        if self.dp > 1 and self.tp > 1:
            raise ValueError(f"data_parallel_size {self.dp} with tensor_parallel_size {self.tp}: tensor-parallel "
                             "attention inside data-parallel groups is not supported yet (use one of the two)")
        if self.world % self.nnodes:
            raise ValueError(f"nnodes {self.nnodes} must divide the world size {self.world}")


def _split(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ValueError(f"{what} = {n} is not divisible by tensor_parallel_size {parts}")
    return n // parts


@dataclass
class _Rule:
    """This rank's slice of one checkpoint tensor: `length` entries from `start` along `dim` (of one expert's 2-D
    weight for expert stacks), zero-padded to `length`; zero=True: a zero tensor (a row-parallel bias off rank 0)."""

    dim: int = 0
    start: int = 0
    length: int = 0
    zero: bool = False


class Sharding:
    """This rank's part of the model (see the module docstring): surgery (`apply`) and the loader's questions."""

    def __init__(self, layout: Layout, rank: int):
        layout.check()
        self.layout, self.rank = layout, rank
        self.tp_rank = rank % layout.tp
        self.rules: dict[str, _Rule] = {}
        self.expert_range: dict[str, range] = {}  # "...experts" -> global ids of this rank's experts

    # ---- surgery --------------------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> None:
        cfg = model.config
        T = self.layout.tp
        for path, module in list(model.named_modules()):
            prefix = f"{path}." if path else ""
            if T > 1 and isinstance(module, Attention):
                self._attention(module, prefix)
            elif T > 1 and isinstance(module, MLA):
                self._mla(module, prefix)
            elif isinstance(module, MoE):
                self._moe(module, prefix, cfg)
            elif T > 1 and isinstance(module, MLP) and not path.endswith("shared_experts"):
                self._mlp(module, prefix)
                module.__class__ = RowParallelMLP
        if T > 1:
            self._vocab(model, cfg)
        model.shard = self

    def _column(self, parent: nn.Module, name: str, prefix: str, block: int) -> None:
        """Output rows [r n/T, (r+1) n/T) of parent.name, cut at multiples of `block` rows (whole heads)."""
        lin = getattr(parent, name)
        T = self.layout.tp
        _split(lin.out_features // block, T, f"{prefix}{name} heads")
        out = lin.out_features // T
        setattr(parent, name, _resized(lin, lin.in_features, out))
        self.rules[f"{prefix}{name}.weight"] = _Rule(0, self.tp_rank * out, out)
        if getattr(lin, "bias", None) is not None:
            self.rules[f"{prefix}{name}.bias"] = _Rule(0, self.tp_rank * out, out)

    def _row(self, parent: nn.Module, name: str, prefix: str) -> None:
        """Input columns [r n/T, (r+1) n/T) of parent.name: a partial output, summed by the block's all-reduce."""
        lin = getattr(parent, name)
        n = _split(lin.in_features, self.layout.tp, f"{prefix}{name} input width")
        if isinstance(lin, QuantLinear) and n % GROUP:
            raise ValueError(f"{prefix}{name}: a quantized row-parallel slice must be a multiple of {GROUP} wide")
        setattr(parent, name, _resized(lin, n, lin.out_features))
        self.rules[f"{prefix}{name}.weight"] = _Rule(1, self.tp_rank * n, n)
        if getattr(lin, "bias", None) is not None and self.tp_rank:
            self.rules[f"{prefix}{name}.bias"] = _Rule(zero=True)

    def _attention(self, m: Attention, prefix: str) -> None:
        T = self.layout.tp
        _split(m.n_kv, T, f"{prefix}num_key_value_heads")
        for name in ("q_proj", "k_proj", "v_proj"):
            self._column(m, name, prefix, m.head_dim)
        self._row(m, "o_proj", prefix)
        m.n_heads, m.n_kv = m.n_heads // T, m.n_kv // T
        m.__class__ = TPAttention

    def _mla(self, m: MLA, prefix: str) -> None:
        T = self.layout.tp
        qk = m.nope_dim + m.rope_dim
        self._column(m, "q_proj" if m.q_lora_rank is None else "q_b_proj", prefix, qk)
        self._column(m, "kv_b_proj", prefix, m.nope_dim + m.v_dim)
        self._row(m, "o_proj", prefix)
        m.n_heads //= T
        m.__class__ = TPMLA

    def _mlp(self, m: MLP, prefix: str) -> None:
        self._column(m, "gate_proj", prefix, 1)
        self._column(m, "up_proj", prefix, 1)
        self._row(m, "down_proj", prefix)

    def _moe(self, m: MoE, prefix: str, cfg) -> None:
        from selfseek.distributed.expert_parallel import EPMoE, partition_experts

        if self.layout.ep > 1:
            from selfseek.distributed.data_parallel import DPEPMoE

            self.expert_range[f"{prefix}experts"] = partition_experts(m.experts, self.rank, self.layout.ep)
            m.__class__ = DPEPMoE if self.layout.dp > 1 else EPMoE  # DP: each rank dispatches its own tokens
            return
        if self.layout.tp == 1:
            return
        T, ex = self.layout.tp, m.experts
        i = _split(cfg.moe_intermediate_size, T, f"{prefix}moe_intermediate_size")
        for proj, (out, inp, dim) in (("gate_proj", (i, cfg.hidden_size, 0)), ("up_proj", (i, cfg.hidden_size, 0)),
                                      ("down_proj", (cfg.hidden_size, i, 1))):
            _resize_stack(ex, proj, ex.n_experts, out, inp)
            self.rules[f"{prefix}experts.{proj}"] = _Rule(dim, self.tp_rank * i, i)
        if m.shared_experts is not None:
            self._mlp(m.shared_experts, f"{prefix}shared_experts.")
        m.__class__ = TPMoE

    def _vocab(self, model: nn.Module, cfg) -> None:
        T, V = self.layout.tp, cfg.vocab_size
        rows = -(-V // T)
        start = self.tp_rank * rows
        rule = _Rule(0, start, rows)
        emb = model.model.embed_tokens
        if isinstance(emb, QuantEmbedding):
            local = VocabParallelQuantEmbedding(emb.in_features, rows, emb.bits, emb.mins is not None)
        else:
            local = VocabParallelEmbedding(rows, cfg.hidden_size)
        local.vocab_start, local.vocab_size = start, V
        model.model.embed_tokens = local
        self.rules["model.embed_tokens.weight"] = self.rules["lm_head.weight"] = rule
        if cfg.tie_word_embeddings and isinstance(local, QuantEmbedding):
            model.lm_head = local  # one quantized matrix both ways
        elif cfg.tie_word_embeddings:
            model.lm_head = VocabParallelHead(cfg.hidden_size, rows, bias=False, device="meta")
            model.lm_head.weight = local.weight
        elif isinstance(model.lm_head, QuantLinear):
            head = model.lm_head
            model.lm_head = VocabParallelQuantEmbedding(head.in_features, rows, head.bits, head.mins is not None)
        else:
            model.lm_head = VocabParallelHead(cfg.hidden_size, rows, bias=False, device="meta")
        model.lm_head.vocab_start, model.lm_head.vocab_size = start, V

    # ---- the loader's questions ------------------------------------------------------------------------
    def owns(self, param: str, index: int | None) -> bool:
        """Whether this rank keeps (part of) a checkpoint tensor: False for another rank's experts."""
        owner = param.rsplit(".", 1)[0]
        r = self.expert_range.get(owner)
        return r is None or index is None or index in r

    def narrow(self, param: str, index: int | None, half: int | None,
               t: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """This rank's part of checkpoint tensor `t` headed for `param` (expert `index`; a fused [E, 2I, M]
        gate_up when `half` is set) -> (that part, the local expert index)."""
        owner = param.rsplit(".", 1)[0]
        r = self.expert_range.get(owner)
        if r is not None:
            if index is not None:
                index = index - r.start
            elif t.shape[0] != len(r):  # a whole [E, ...] stack
                t = t[r.start : r.stop]
        rule = self.rules.get(param)
        if rule is None:
            return t, index
        if rule.zero:
            return torch.zeros_like(t), index
        stacked = param.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj")) and index is None
        dim = rule.dim + (1 if stacked else 0)
        if half is not None:  # gate and up halves of dim 1, each sliced alike
            return torch.cat([_take(p, dim, rule) for p in t.chunk(2, dim=1)], dim=1), index
        return _take(t, dim, rule), index

    def cuts(self, param: str, shape: tuple[int, ...]) -> list[tuple[int, int, int]] | None:
        """This rank's part of a whole checkpoint tensor of `shape` headed for `param` (an expert stack [E, ...]
        whole) as `narrow` takes it, for loaders that slice their own encoding (GGUF's blocks): (dim, start,
        length) cuts applied in order, a length past the end zero-padded; None: all zeros."""
        out = []
        r = self.expert_range.get(param.rsplit(".", 1)[0])
        if r is not None and shape[0] != len(r):
            out.append((0, r.start, len(r)))
        rule = self.rules.get(param)
        if rule is None:
            return out
        if rule.zero:
            return None
        stacked = param.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj"))
        out.append((rule.dim + stacked, rule.start, rule.length))
        return out


def _take(t: torch.Tensor, dim: int, rule: _Rule) -> torch.Tensor:
    n = max(0, min(rule.length, t.shape[dim] - rule.start))
    part = t.narrow(dim, rule.start, n) if n else t.narrow(dim, 0, 0)
    if n == rule.length:
        return part
    pad = list(t.shape)
    pad[dim] = rule.length - n
    return torch.cat([part, t.new_zeros(pad)], dim=dim)


def _resized(lin: nn.Module, in_features: int, out_features: int) -> nn.Module:
    """A layer of the same kind as `lin` (on the meta device) with new sizes."""
    if isinstance(lin, QuantLinear):
        return QuantLinear(in_features, out_features, lin.bits, lin.mins is not None)
    return nn.Linear(in_features, out_features, bias=lin.bias is not None, device="meta")


def _resize_stack(ex: Experts, proj: str, n: int, out: int, inp: int) -> None:
    w = getattr(ex, proj)
    delattr(ex, proj)
    if isinstance(w, QuantStack):
        if inp % GROUP:
            raise ValueError(f"a quantized expert slice must be a multiple of {GROUP} wide, got {inp}")
        setattr(ex, proj, QuantStack(n, inp, out, w.bits))
    else:
        setattr(ex, proj, nn.Parameter(torch.empty(n, out, inp, dtype=w.dtype, device="meta"), requires_grad=False))


def _all_reduce(y: torch.Tensor) -> torch.Tensor:
    return comm_mod.current().all_reduce(y)


class TPAttention(Attention):
    """GQA over this rank's heads; the partial o_proj outputs summed over the ranks."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return _all_reduce(super().forward(*args, **kwargs))


class TPMLA(MLA):
    """MLA over this rank's heads (latent replicated); the partial o_proj outputs summed over the ranks."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return _all_reduce(super().forward(*args, **kwargs))


class RowParallelMLP(MLP):
    """A SwiGLU MLP over this rank's slice of the intermediate; partial down_proj outputs summed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce(super().forward(x))


class TPMoE(MoE):
    """DeepSeekMoE with every expert's intermediate split (routed and shared alike): one all-reduce per block.
    The router is replicated, so every rank picks the same experts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce(super().forward(x))


def _vocab_mask(m: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    local = ids - m.vocab_start
    inside = (local >= 0) & (local < m.weight_rows)
    return local.clamp(0, m.weight_rows - 1), inside


def _gather_vocab(m: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    return comm_mod.current().all_gather(logits, dim=-1)[..., : m.vocab_size]


class VocabParallelEmbedding(nn.Module):
    """Rows [vocab_start, vocab_start + rows) of the embedding: tokens outside them look up zeros; the ranks'
    lookups summed. Not an nn.Embedding, so CausalLM.embed calls `embed`."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim), requires_grad=False)
        self.vocab_start, self.vocab_size = 0, rows

    @property
    def weight_rows(self) -> int:
        return self.weight.shape[0]

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        local, inside = _vocab_mask(self, ids)
        h = F.embedding(local, self.weight).to(dtype) * inside[..., None].to(dtype)
        return _all_reduce(h)


class VocabParallelHead(nn.Linear):
    """lm_head over this rank's vocabulary rows; every rank's logits gathered into the full vocabulary."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _gather_vocab(self, super().forward(x))


class HalfVocabParallelHead(VocabParallelHead, HalfLinear):
    """VocabParallelHead with its rows in bf16/fp16 storage, computed in fp32 by HalfLinear."""


# 16-bit storage (models/quant.py keep_16bit_storage) for each rank's vocabulary rows too; the embedding's lookup
# already casts the rows it takes to the compute dtype.
register_16bit_storage(VocabParallelEmbedding, VocabParallelEmbedding)
register_16bit_storage(VocabParallelHead, HalfVocabParallelHead)


class VocabParallelQuantEmbedding(QuantEmbedding):
    """The quantized form of both: embedding rows and (tied, or a quantized lm_head) the output head."""

    @property
    def weight_rows(self) -> int:
        return self.out_features

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        local, inside = _vocab_mask(self, ids)
        return _all_reduce(super().embed(local, dtype) * inside[..., None].to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _gather_vocab(self, super().forward(x))
