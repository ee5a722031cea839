"""A decode step as a fixed sequence of native kernel calls: the CPU's captured step.

Every op of a decode step through the decoder layers with packed weights already runs in a native kernel: residual
add + RMSNorm, the fused projections, rotary, paged attention, MLA's per-head absorbed products, routing and the
fused experts. What the module path adds around them is Python and torch glue (nn.Module calls, views, checks,
allocations: about 0.3 ms per Llama layer on a 2-core EPYC, a quarter of the default model's step). Here each
layer's kernel views are made once (made again when a weight is replaced) and a step is a few calls per layer into
buffers allocated once per step: the same kernels with the same arguments in the same order as the module path, so
the result is bit for bit the same (tests/test_native_step.py). It takes only what it can run exactly so; anything
else (prefill rows, LoRA, hooks, autograd, V3.2's indexer, linear layers with a bias) runs the module path. Packed
and float32 weights alike: the module path runs float32 nn.Linear layers in the same kernels (layers.run_linear).
With an fp32 cache the layer loop itself runs in fused_ops.cpp (_CLayers: one call per step, the router too, through
routing.cpp's selfseek_gate as the Gate module calls it; its products through kernels.entry's functions, so the
opt-in int8 activations too): the Python glue left between kernels, about 90 us per Llama layer and more per MLA +
MoE layer, was a sixth to a fifth of a decode step.

    for each layer: x = RMSNorm(residual += ffn)             add_rms_norm
                    a = attention(x)                          GQA or MLA below
                    x = RMSNorm(residual += a)               add_rms_norm
                    ffn = MLP(x) or MoE(x)                    dense below, or router + fused experts + shared MLP
    GQA: qkv = x Wqkv^T; rotary on q, k in place; pool[slots] = k, v; o = paged_attention(q); a = o Wo^T
    MLA: [q_a; c; k_r] = x W^DQKV; q = RMSNorm(q_a) W^UQ; pool[slots] = [RMSNorm(c); RoPE(k_r)];
         q_lat = q_nope W^UK per head; o_lat = paged_attention([q_lat; RoPE(q_rope)]); a = (o_lat W^UV per head) Wo^T
    dense: a = down(silu(gate x) * up x), gate/up one product
"""

from __future__ import annotations

import ctypes
import operator
from dataclasses import dataclass

import torch
from torch import nn

from selfseek import kernels
from selfseek.kernels import fused_ops
from selfseek.models import attention_backend as backend
from selfseek.models.attention import Attention
from selfseek.models.batch import AttnBatch
from selfseek.models.decoder import DecoderLayer
from selfseek.models.layers import MLP, RMSNorm, fused_rows, global_hooks
from selfseek.models.mla import MLA, HeadProduct
from selfseek.models.moe import Experts, MoE, routing_library
from selfseek.models.quant import HalfLinear, QuantLinear, QuantStack


class Unsupported(Exception):
    """A layer the native step does not run exactly as the module path: the model keeps the module path."""


_FLOAT_STORAGE = (torch.float32, torch.bfloat16, torch.float16)


def _product(layer: nn.Module | None) -> tuple[kernels.Weight, kernels._Mat]:
    """A linear layer's weight (held, so the view stays valid) and its kernel view: a packed layer, or a float
    nn.Linear (float32) or HalfLinear (16-bit storage) without bias, which the module path runs in the same kernels
    (layers.run_linear, HalfLinear.forward)."""
    if type(layer) is QuantLinear:
        return layer.packed, kernels.prepare(layer.packed)
    dtypes = {nn.Linear: (torch.float32,), HalfLinear: _FLOAT_STORAGE}.get(type(layer), ())
    w = layer.weight.detach() if dtypes else None  # the class first: another's `weight` may dequantize (QuantLinear)
    if w is None or w.dtype not in dtypes or layer.bias is not None or w.device.type != "cpu" or not w.is_contiguous():
        raise Unsupported(f"{type(layer).__name__} is not a packed or float linear layer without bias")
    return w, kernels.prepare(w)


def _norm(norm: nn.Module) -> RMSNorm:
    w = getattr(norm, "weight", None)
    if type(norm) is not RMSNorm or w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous():
        raise Unsupported("not a float32 RMSNorm")
    return norm


@dataclass
class _Step:
    """What every layer of one step shares: the kernels, the batch and the step's buffers (made lazily, once)."""

    qlib: ctypes.CDLL
    flib: ctypes.CDLL
    alib: ctypes.CDLL
    T: int
    cos: torch.Tensor
    sin: torch.Tensor
    batch: AttnBatch

    def __post_init__(self) -> None:
        self._buffers: dict = {}
        self.attn_args: list | None = None  # paged attention's argument list, made for the first layer's pool

    def buffer(self, name: str, *shape: int) -> torch.Tensor:
        b = self._buffers.get(name)
        if b is None:
            b = self._buffers[name] = torch.empty(self.T, *shape)
        return b

    def linear(self, product: tuple[kernels.Weight, kernels._Mat], x: torch.Tensor, out: str) -> torch.Tensor:
        """kernels.linear's row kernel: y = x W^T into the step's buffer `out` (x: contiguous rows)."""
        m = product[1]
        y = self.buffer(out, m.rows)
        linear = kernels.entry(self.qlib, "selfseek_linear")
        rc = linear(ctypes.byref(m), x.data_ptr(), self.T, m.cols, y.data_ptr(), m.rows)
        kernels._check(rc, "linear")
        return y

    def norm(self, norm: RMSNorm, x: torch.Tensor, out: str) -> torch.Tensor:
        """RMSNorm(x) of rows with any row stride into a contiguous buffer (add_rms_norm without the add)."""
        y = self.buffer(out, x.shape[1])
        self.flib.selfseek_add_rms_norm(x.data_ptr(), x.stride(0), None, 0, norm.weight.data_ptr(), y.data_ptr(),
                                        self.T, x.shape[1], norm.eps)
        return y

    def rope(self, x: torch.Tensor, out: torch.Tensor, interleaved: bool) -> None:
        """Rotary (fused_ops.rope's kernel) of x [T, heads, d] into out (may be x), both with contiguous heads."""
        self.flib.selfseek_rope(x.data_ptr(), x.stride(0), x.stride(1), out.data_ptr(), out.stride(0), out.stride(1),
                                self.T, x.shape[1], x.shape[2], self.cos.data_ptr(), self.sin.data_ptr(),
                                int(interleaved))

    def attend(self, q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               scale: float) -> None:
        """Paged attention of q [T, kv, g, dk] into out [T, kv, g, dv]; the layers' pools share shapes and strides,
        so the argument list is made once and only the cache addresses change."""
        if self.attn_args is None:
            self.attn_args = backend.kernel_args(q, out, k_cache, v_cache, self.batch.paged, scale)
        args = self.attn_args
        args[backend.K_ARG], args[backend.V_ARG] = k_cache.data_ptr(), v_cache.data_ptr()
        backend.run_kernel(self.alib, args, self.batch.paged)


_POOL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _store(pool: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """The step's new cache rows into their slots, rounded to a 16-bit pool's dtype as the module path does."""
    pool.index_copy_(0, slots, rows if rows.dtype == pool.dtype else rows.to(pool.dtype))


class _GQA:
    """Attention's decode branch (models/attention.py): rows that all read the cache in place."""

    def __init__(self, attn: Attention):
        if type(attn) is not Attention or attn.q_norm is not None:
            raise Unsupported("not a plain GQA attention")
        self.attn = attn
        self.qkv = _product(fused_rows(attn, (attn.q_proj, attn.k_proj, attn.v_proj)))
        self.o = _product(attn.o_proj)

    def run(self, s: _Step, x: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        at, T = self.attn, s.T
        H, K, d = at.n_heads, at.n_kv, at.head_dim
        qkv = s.linear(self.qkv, x, "qkv")
        qk = qkv[:, : (H + K) * d].view(T, H + K, d)
        s.rope(qk, qk, at.rotary.interleaved)  # q and k heads, in place
        _store(pool, s.batch.slot_mapping, qkv[:, H * d :].view(T, 2, K, d))
        q = qkv[:, : H * d].view(T, K, H // K, d)
        if T > 1:  # paged_attention takes q contiguous
            q = s.buffer("q", K, H // K, d).copy_(q)
        out = s.buffer("attn", K, H // K, d)
        s.attend(q, out, pool[:, 0], pool[:, 1], at.scale)
        return s.linear(self.o, out, "a")


class _MLA:
    """MLA's absorbed decode (models/mla.py: forward, _attend_paged) with W^UK / W^UV read per head by kernels.heads."""

    def __init__(self, attn: MLA):
        if type(attn) is not MLA or attn.indexer is not None or attn.q_lora_rank is None:
            raise Unsupported("not an MLA layer with query compression and no indexer")
        self.attn = attn
        self.down = _product(attn._fused_down())
        self.q_b, self.o = _product(attn.q_b_proj), _product(attn.o_proj)
        self.q_norm, self.kv_norm = _norm(attn.q_a_layernorm), _norm(attn.kv_a_layernorm)

    def run(self, s: _Step, x: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        at, T = self.attn, s.T
        h, d, r, v, c, ql = at.n_heads, at.nope_dim, at.rope_dim, at.v_dim, at.latent_dim, at.q_lora_rank
        down = s.linear(self.down, x, "down")  # [q_a; c_KV; k_rope]
        q = s.linear(self.q_b, s.norm(self.q_norm, down[:, :ql], "q_c"), "q").view(T, h, d + r)
        q_rope = s.buffer("q_rope", h, r)
        s.rope(q[:, :, d:], q_rope, at.rotary.interleaved)
        kv = s.buffer("kv", c + r)
        kv[:, :c].copy_(s.norm(self.kv_norm, down[:, ql : ql + c], "latent"))
        s.rope(down[:, ql + c :].view(T, 1, r), kv[:, c:].view(T, 1, r), at.rotary.interleaved)
        _store(pool, s.batch.slot_mapping, kv)
        w_uk, w_uv = at.absorbed_products()
        q_nope = s.buffer("q_nope", h, d).copy_(q[:, :, :d])
        q_lat = s.buffer("q_latent", h, c)
        self._heads(s, w_uk, q_nope, q_lat)
        q_att = torch.cat([q_lat, q_rope], dim=-1, out=s.buffer("q_att", h, c + r)).view(T, 1, h, c + r)
        o_lat = s.buffer("o_latent", 1, h, c)
        s.attend(q_att, o_lat, pool[:, None, : c + r], pool[:, None, :c], at.scale)
        o = s.buffer("o_heads", h, v)
        self._heads(s, w_uv, o_lat.view(T, h, c), o)
        return s.linear(self.o, o, "a")

    def _heads(self, s: _Step, p: HeadProduct, x: torch.Tensor, y: torch.Tensor) -> None:
        """kernels.heads's kernel into y for one of MLA.absorbed_products."""
        heads = kernels.entry(s.qlib, "selfseek_heads")
        rc = heads(ctypes.byref(p.view), x.data_ptr(), s.T, self.attn.n_heads, p.per_head, p.off, p.n,
                   int(p.transposed), y.data_ptr())
        kernels._check(rc, "heads")


class _Dense:
    """MLP.forward: down(silu(gate x) * up x), gate/up one product."""

    def __init__(self, mlp: MLP, name: str = ""):
        if type(mlp) is not MLP:
            raise Unsupported("not a SwiGLU MLP")
        self.gate_up = _product(fused_rows(mlp, (mlp.gate_proj, mlp.up_proj)))
        self.down = _product(mlp.down_proj)
        self.inter, self.name = mlp.gate_proj.out_features, name

    def run(self, s: _Step, x: torch.Tensor) -> torch.Tensor:
        gate_up = s.linear(self.gate_up, x, self.name + "gate_up")
        act = s.buffer(self.name + "act", self.inter)
        s.flib.selfseek_silu_mul(gate_up.data_ptr(), gate_up.stride(0), act.data_ptr(), s.T, self.inter)  # MLP's
        return s.linear(self.down, act, self.name + "mlp")


class _MoE:
    """MoE.forward: the router (its module), the fused routed experts, plus the shared experts."""

    def __init__(self, moe: MoE):
        if type(moe) is not MoE or type(moe.experts) is not Experts:
            raise Unsupported("not a DeepSeekMoE layer")
        stacks = [getattr(moe.experts, p) for p in ("gate_proj", "up_proj", "down_proj")]
        if all(type(st) is QuantStack for st in stacks):
            self.stacks = [st.packed for st in stacks]
        elif all(isinstance(st, torch.Tensor) and st.dtype in _FLOAT_STORAGE and st.device.type == "cpu"
                 for st in stacks):
            self.stacks = [st.detach() for st in stacks]  # Experts.forward's fused_experts takes float stacks too
        else:
            raise Unsupported("expert stacks neither packed nor float")
        self.moe = moe
        if not kernels.moe_native(torch.empty(0), *self.stacks):
            raise Unsupported("the fused experts kernel cannot take these stacks")
        self.prepared = kernels.prepare_stacks(*self.stacks)
        self.shared = None if moe.shared_experts is None else _Dense(moe.shared_experts, "shared_")

    def run(self, s: _Step, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.moe.gate(x)
        y = kernels.moe(x, weights, ids, *self.stacks, prepared=self.prepared)  # Experts.forward's fused_experts
        return y if self.shared is None else y.add_(self.shared.run(s, x))  # the same sum as y + shared(x)


def _attention(layer: DecoderLayer) -> _GQA | _MLA:
    return _MLA(layer.self_attn) if type(layer.self_attn) is MLA else _GQA(layer.self_attn)


def _ffn(layer: DecoderLayer) -> _Dense | _MoE:
    return _MoE(layer.mlp) if type(layer.mlp) is MoE else _Dense(layer.mlp)


class _Layer:
    def __init__(self, layer: DecoderLayer):
        if type(layer) is not DecoderLayer:
            raise Unsupported(f"{type(layer).__name__} is not a DecoderLayer")
        self.in_norm, self.post_norm = _norm(layer.input_layernorm), _norm(layer.post_attention_layernorm)
        self.attn, self.ffn = _attention(layer), _ffn(layer)


def _fill_dense(st: fused_ops.DecodeLayer, mlp: _Dense) -> None:
    st.gate_up, st.mlp_down = ctypes.addressof(mlp.gate_up[1]), ctypes.addressof(mlp.down[1])
    st.inter = mlp.inter


class _CLayers:
    """The layer loop as fused_ops.cpp runs it (selfseek_decode_layers: each layer's _GQA / _MLA then _Dense / _MoE with
    the same kernels and arguments, the router as Gate's selfseek_gate), for fp32 pools: one call per step. timings,
    when set (bench --profile), gathers seconds per layer: [attention, router, MLP or experts]."""

    def __init__(self, layers: list[_Layer]):
        if len({type(la.attn) for la in layers}) != 1:
            raise Unsupported("GQA and MLA layers mixed")
        self.layers = layers
        self.mla = type(layers[0].attn) is _MLA
        self.timings: ctypes.Array | None = None
        routing = routing_library()
        if any(type(la.ffn) is _MoE for la in layers) and routing is None:
            raise Unsupported("no routing kernel")
        self.gate = None if routing is None else ctypes.cast(routing.selfseek_gate, ctypes.c_void_p).value
        self.structs = (fused_ops.DecodeLayer * len(layers))()
        for st, la in zip(self.structs, layers, strict=True):
            at = la.attn.attn
            st.in_norm, st.in_eps = la.in_norm.weight.data_ptr(), la.in_norm.eps
            st.post_norm, st.post_eps = la.post_norm.weight.data_ptr(), la.post_norm.eps
            st.mla, st.scale, st.interleaved = self.mla, at.scale, at.rotary.interleaved
            st.o, st.heads = ctypes.addressof(la.attn.o[1]), at.n_heads
            if self.mla:
                a = la.attn
                st.down, st.q_b = ctypes.addressof(a.down[1]), ctypes.addressof(a.q_b[1])
                st.q_norm, st.q_eps = a.q_norm.weight.data_ptr(), a.q_norm.eps
                st.kv_norm, st.kv_eps = a.kv_norm.weight.data_ptr(), a.kv_norm.eps
                st.nope, st.rope, st.v_dim, st.latent, st.q_lora = (at.nope_dim, at.rope_dim, at.v_dim,
                                                                     at.latent_dim, at.q_lora_rank)
            else:
                st.qkv, st.n_kv, st.head_dim = ctypes.addressof(la.attn.qkv[1]), at.n_kv, at.head_dim
            if type(la.ffn) is _Dense:
                _fill_dense(st, la.ffn)
            else:
                moe = la.ffn
                st.moe, st.n_experts, st.top_k = True, moe.prepared[3], moe.moe.gate.top_k
                st.e_gate, st.e_up, st.e_down = (ctypes.addressof(m) for m in moe.prepared[:3])
                if (args := moe.moe.gate.native_args()) is None or args[3] != st.n_experts:
                    raise Unsupported("a router the routing kernel cannot read")
                (st.router, st.scoring, st.router_bias, _, st.method, st.n_group, st.topk_group, _, st.norm,
                 st.route_scale) = args
                if moe.shared is not None:
                    _fill_dense(st, moe.shared)

    def _step(self, s: _Step, h: torch.Tensor, pool: torch.Tensor) -> tuple[fused_ops.DecodeStep, torch.Tensor]:
        """The step's kernels, batch and pool strides (the first pool's: they all share shapes), and the slot
        mapping the struct points into (the caller keeps it alive)."""
        paged, slots = s.batch.paged, s.batch.slot_mapping.contiguous()
        if self.mla:  # as _MLA.run hands them to the attention kernel
            c, r = self.layers[0].attn.attn.latent_dim, self.layers[0].attn.attn.rope_dim
            k, v = pool[:, None, : c + r], pool[:, None, :c]
        else:
            k, v = pool[:, 0], pool[:, 1]
        return fused_ops.DecodeStep(
            linear=ctypes.cast(kernels.entry(s.qlib, "selfseek_linear"), ctypes.c_void_p).value,
            attention=ctypes.cast(s.alib.selfseek_paged_attention, ctypes.c_void_p).value,
            heads=ctypes.cast(kernels.entry(s.qlib, "selfseek_heads"), ctypes.c_void_p).value,
            moe=ctypes.cast(kernels.entry(s.qlib, "selfseek_moe"), ctypes.c_void_p).value,
            gate=self.gate,
            timings=None if self.timings is None else ctypes.addressof(self.timings),
            rows=s.T, hidden=h.shape[1], cos=s.cos.data_ptr(), sin=s.sin.data_ptr(), slots=slots.data_ptr(),
            block_tables=paged.block_tables.data_ptr(), cu_q=paged.cu_q.data_ptr(),
            context_lens=paged.context_lens.data_ptr(), table_stride=paged.block_tables.stride(0),
            block_size=paged.block_size, num_seqs=len(paged.context_lens), n_threads=torch.get_num_threads(),
            k_slot_stride=k.stride(0), k_head_stride=k.stride(1), v_offset=(v.data_ptr() - pool.data_ptr()) // 4,
            v_slot_stride=v.stride(0), v_head_stride=v.stride(1)), slots

    def run(self, s: _Step, h: torch.Tensor, pools: list[torch.Tensor]) -> torch.Tensor:
        for st, la, pool in zip(self.structs, self.layers, pools, strict=True):
            st.pool = pool.data_ptr()
            if self.mla:  # read per step, as _MLA.run does (a GGUF's split halves or kv_b_proj as stored)
                for field, p in zip(("uk", "uv"), la.attn.attn.absorbed_products(), strict=True):
                    setattr(st, field, fused_ops.HeadProduct(ctypes.addressof(p.view), p.per_head, p.off, p.n,
                                                             p.transposed))
        step, _slots = self._step(s, h, pools[0])
        residual = h.clone()
        self._check(s.flib.selfseek_decode_layers(ctypes.byref(step), self.structs, len(self.structs),
                                                  residual.data_ptr()))
        return residual

    @staticmethod
    def _check(rc: int) -> None:
        if rc:
            raise ValueError(f"decode step: a kernel of layer {-rc % 1000000} rejected its arguments (code {rc})")


class NativeStack:
    """The decode step over a model's decoder layers (see the module docstring); `for_model` makes or finds it."""

    def __init__(self, layers: list[DecoderLayer]):
        self.layers = [_Layer(layer) for layer in layers]  # fuses q/k/v and gate/up first: then snapshot
        try:
            self.native: _CLayers | None = _CLayers(self.layers)
        except Unsupported:
            self.native = None
        self._modules = [m for layer in layers for m in layer.modules()]
        # every submodule, buffer and parameter of the stack as (its dict, name, object) at build: a module or weight
        # replaced since (not one changed in place) makes the stack stale; checked each step in one flat pass
        slots = [(d, name, obj) for m in self._modules for d in (m._modules, m._buffers, m._parameters)
                 for name, obj in d.items()]
        self._dicts, self._names, self._objects = (list(t) for t in zip(*slots, strict=True)) if slots else ([], [], [])
        self._hook_dicts = [h for m in self._modules for h in (m._forward_hooks, m._forward_pre_hooks)]

    # current() and hooked() run every step over ~700 slots and ~500 hook dicts on the medium V3: map()s in C rather
    # than generator expressions, which took 0.65 ms of a 16 ms step (cProfile, 2 threads)
    def current(self) -> bool:
        """Whether the layers hold the modules and weights the stack was made from."""
        return all(map(operator.is_, map(dict.get, self._dicts, self._names), self._objects))

    def hooked(self) -> bool:
        """Whether any module of the stack has forward hooks (a profile's timers, a served LoRA adapter's hook): the
        module path runs them, this one could not."""
        return global_hooks() or any(self._hook_dicts)

    @staticmethod
    def for_model(model: nn.Module) -> NativeStack | None:
        """The model's NativeStack (kept on it, made again when a weight is replaced), or None where a layer is not
        one it runs exactly as the module path or the native kernels are not loaded."""
        layers = list(model.model.layers)
        cached = model.__dict__.get("_native_stack")
        if cached is not None and cached[0] == tuple(map(id, layers)):
            stack = cached[1]
            if stack is None or stack.current():
                return stack
        stack = None
        if (layers and kernels.available() and fused_ops._load() is not None
                and backend._kernel(torch.device("cpu")) is not None):
            try:
                with torch.no_grad():  # fused_rows declines while autograd could record the float weights
                    stack = NativeStack(layers)
            except Unsupported:
                stack = None
        model.__dict__["_native_stack"] = (tuple(map(id, layers)), stack)
        return stack

    def takes(self, h: torch.Tensor, batch: AttnBatch, pools: list[torch.Tensor] | None) -> bool:
        """Whether this step is one it runs exactly as the module path would: every row a decode (or a short chunk)
        reading the cache in place, few enough rows for the row kernels, float pools (fp32, or 16-bit: rows
        rounded to the pool's dtype as they are written), no autograd, no hooks."""
        paged = batch.paged
        if (torch.is_grad_enabled() or pools is None or paged is None or batch.prefills or paged.start != 0
                or batch.slot_mapping is None or batch.decode_mode != "absorbed" or h.dtype != torch.float32
                or h.device.type != "cpu" or h.shape[0] >= kernels.GEMM_MIN_ROWS
                or pools[0].dtype not in _POOL_DTYPES
                or any(p.dtype != pools[0].dtype or p.shape != pools[0].shape for p in pools)):  # one arg list
            return False
        from selfseek.models.layers import _lora_state

        if getattr(_lora_state, "rows", None) is not None or self.hooked():
            return False
        # no long chunk after a cached prefix: those attend gathered / expanded on the module path
        return paged.split(min(Attention.GATHER_MIN_ROWS, MLA.EXPANDED_MIN_ROWS))[0] == 0

    def run(self, h: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], batch: AttnBatch,
            pools: list[torch.Tensor]) -> torch.Tensor:
        """h [T, m] (the embeddings) -> the last hidden states before the final norm [T, m], as _fused_layers."""
        s = _Step(kernels._load(), fused_ops._load(), backend._kernel(torch.device("cpu")), h.shape[0],
                  *(t.contiguous() for t in cos_sin), batch)
        if self.native is not None and pools[0].dtype == torch.float32:
            return self.native.run(s, h, pools)
        T, m = h.shape
        residual = h.clone()
        x, ffn = s.buffer("x", m), None
        for layer, pool in zip(self.layers, pools, strict=True):
            norm = layer.in_norm
            s.flib.selfseek_add_rms_norm(residual.data_ptr(), m, None if ffn is None else ffn.data_ptr(), m,
                                         norm.weight.data_ptr(), x.data_ptr(), T, m, norm.eps)
            a = layer.attn.run(s, x, pool)
            norm = layer.post_norm
            s.flib.selfseek_add_rms_norm(residual.data_ptr(), m, a.data_ptr(), m, norm.weight.data_ptr(), x.data_ptr(),
                                         T, m, norm.eps)
            ffn = layer.ffn.run(s, x)
        return residual.add_(ffn)
