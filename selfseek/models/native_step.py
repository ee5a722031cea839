"""The decode step of a Llama-shaped stack as a fixed sequence of native kernel calls: the CPU's captured step.

Every op of a decode step through DecoderLayer(Attention, MLP) with packed weights already runs in a native
kernel: residual add + RMSNorm, the fused q/k/v and gate/up products, rotary in place, paged attention. What the
module path adds around them is Python and torch glue (nn.Module calls, views, checks, allocations: about 0.3 ms
per layer on a 2-core EPYC, a quarter of the default model's step). Here each layer's kernel views are made once
(rebuilt when a weight is replaced) and a step is ~10 calls per layer into buffers allocated once per step: the
same kernels with the same arguments in the same order as the module path, so the result is bit for bit the
same (tests/test_native_step.py). It takes only what it can run exactly so; anything else (prefill rows, LoRA,
hooks, autograd, other layer types, float weights multiplied by torch's BLAS) runs the module path.

    for each layer: x = RMSNorm(residual += m)           add_rms_norm
                    qkv = x Wqkv^T; rotary on q, k        linear, rope (in place)
                    pool[slots] = k, v                    index_copy_
                    o = paged_attention(q, pool)          the C kernel
                    x = RMSNorm(residual += o Wo^T)       linear, add_rms_norm
                    m = down(silu(gate) * up)(x)          linear, silu, mul, linear
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from selfseek import kernels
from selfseek.kernels import fused_ops
from selfseek.models import attention_backend as backend
from selfseek.models.attention import Attention
from selfseek.models.batch import AttnBatch
from selfseek.models.decoder import DecoderLayer
from selfseek.models.layers import MLP, RMSNorm, fused_rows
from selfseek.models.quant import QuantLinear


class _Layer:
    """One layer's kernel views, made from its modules (the fused q/k/v and gate/up layers of fused_rows)."""

    def __init__(self, layer: DecoderLayer):
        attn, mlp = layer.self_attn, layer.mlp
        self.parts = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        qkv = fused_rows(attn, self.parts[:3])
        gate_up = fused_rows(mlp, self.parts[4:6])
        if not isinstance(qkv, QuantLinear) or not isinstance(gate_up, QuantLinear):
            raise TypeError("q/k/v or gate/up do not fuse into one packed layer")
        # (weight, its kernel view) per product: the weight tensors are held so the views stay valid
        self.products = [(w, kernels.prepare(w)) for w in (qkv.packed, attn.o_proj.packed, gate_up.packed,
                                                          mlp.down_proj.packed)]
        self.buffers = self._buffers()  # what a replaced weight changes: checked every step
        self.in_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm

    def _buffers(self) -> tuple:
        return tuple(p._buffers[n] for p in self.parts for n in ("qweight", "scales", "mins"))

    def current(self) -> bool:
        return all(a is b for a, b in zip(self._buffers(), self.buffers, strict=True))


def _supported(layer: torch.nn.Module) -> bool:
    if type(layer) is not DecoderLayer or type(layer.self_attn) is not Attention or type(layer.mlp) is not MLP:
        return False
    if type(layer.input_layernorm) is not RMSNorm or type(layer.post_attention_layernorm) is not RMSNorm:
        return False
    attn, mlp = layer.self_attn, layer.mlp
    parts = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if attn.q_norm is not None or attn.rotary.interleaved or any(type(p) is not QuantLinear for p in parts):
        return False
    norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
    return all(n.dtype == torch.float32 and n.device.type == "cpu" and n.is_contiguous() for n in norms)


def _hooked(layers: list[torch.nn.Module]) -> bool:
    """Whether any module of the stack has forward hooks (a profile's timers, a served LoRA adapter's hook): the
    module path runs them, this one could not."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or "_lora" in m.__dict__
               for layer in layers for m in layer.modules())


class NativeStack:
    """The decode step over a model's decoder layers (see the module docstring); `for_model` makes or finds it."""

    def __init__(self, layers: list[DecoderLayer]):
        self.layers = [_Layer(layer) for layer in layers]
        self.modules = layers
        attn = layers[0].self_attn
        self.n_heads, self.n_kv, self.head_dim, self.scale = attn.n_heads, attn.n_kv, attn.head_dim, attn.scale
        self.hidden = layers[0].input_layernorm.weight.shape[0]
        self.inter = layers[0].mlp.gate_proj.out_features

    @staticmethod
    def for_model(model: torch.nn.Module) -> NativeStack | None:
        """The model's NativeStack (kept on it, made again when a weight is replaced), or None where its layers are
        not all plain Llama-shaped ones with packed weights or the native kernels are not loaded."""
        layers = list(model.model.layers)
        cached = model.__dict__.get("_native_stack")
        if cached is not None and cached[0] == tuple(map(id, layers)):
            stack = cached[1]
            if stack is None or all(layer.current() for layer in stack.layers):
                return stack
        stack = None
        if (layers and all(_supported(layer) for layer in layers) and kernels.available()
                and fused_ops._load() is not None and backend._kernel(torch.device("cpu")) is not None):
            try:
                stack = NativeStack(layers)
            except TypeError:
                stack = None
        model.__dict__["_native_stack"] = (tuple(map(id, layers)), stack)
        return stack

    def takes(self, h: torch.Tensor, batch: AttnBatch, pools: list[torch.Tensor] | None) -> bool:
        """Whether this step is one it runs exactly as the module path would: every row a decode (or a short chunk)
        reading the cache in place, few enough rows for the row kernels, float32 pools, no autograd, no hooks."""
        paged = batch.paged
        if (torch.is_grad_enabled() or pools is None or paged is None or batch.prefills or paged.start != 0
                or batch.slot_mapping is None or h.dtype != torch.float32 or h.device.type != "cpu"
                or h.shape[0] >= kernels.GEMM_MIN_ROWS
                or any(p.dtype != torch.float32 or p.shape != pools[0].shape for p in pools)):  # run() reuses strides
            return False
        from selfseek.models.layers import _lora_state

        if getattr(_lora_state, "rows", None) is not None or _hooked(self.modules):
            return False
        return paged.split(Attention.GATHER_MIN_ROWS)[0] == 0  # no long chunk: the module path's in-place branch

    def run(self, h: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], batch: AttnBatch,
            pools: list[torch.Tensor]) -> torch.Tensor:
        """h [T, m] (the embeddings) -> the last hidden states before the final norm [T, m], as _fused_layers."""
        qlib, flib, alib = kernels._load(), fused_ops._load(), backend._kernel(torch.device("cpu"))
        T, m = h.shape
        H, K, d, inter = self.n_heads, self.n_kv, self.head_dim, self.inter
        n_qkv = (H + 2 * K) * d
        cos, sin = (t.contiguous() for t in cos_sin)
        residual = h.clone()
        x, a, mlp_out = torch.empty(T, m), torch.empty(T, m), torch.empty(T, m)
        qkv, gate_up = torch.empty(T, n_qkv), torch.empty(T, 2 * inter)
        attn = torch.empty(T, K, H // K, d)
        q = qkv[:, : H * d].view(T, K, H // K, d) if T == 1 else torch.empty(T, K, H // K, d)
        kv = qkv[:, H * d :].view(T, 2, K, d)
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        slots = batch.slot_mapping
        pool = pools[0]
        args = backend.kernel_args(q, attn, pool[:, 0], pool[:, 1], batch.paged, self.scale)
        v_offset = pool[:, 1].data_ptr() - pool.data_ptr()
        products = [[(kernels.row_kernel(qlib, mat, T), ctypes.byref(mat)) for _, mat in layer.products]
                    for layer in self.layers]
        mlp_prev = None
        for i, layer in enumerate(self.layers):
            (qkv_f, qkv_m), (o_f, o_m), (gu_f, gu_m), (down_f, down_m) = products[i]
            norm = layer.in_norm
            flib.selfseek_add_rms_norm(residual.data_ptr(), m, mlp_prev, m, norm.weight.data_ptr(), x.data_ptr(), T, m,
                                       norm.eps)
            kernels._check(qkv_f(qkv_m, x.data_ptr(), T, m, qkv.data_ptr(), n_qkv), "linear")
            flib.selfseek_rope(qkv.data_ptr(), n_qkv, d, qkv.data_ptr(), n_qkv, d, T, H + K, d, cos.data_ptr(),
                               sin.data_ptr(), 0)
            pool = pools[i]
            pool.index_copy_(0, slots, kv)
            if T > 1:
                q.copy_(qkv[:, : H * d].view(T, K, H // K, d))
            args[backend.K_ARG], args[backend.V_ARG] = pool.data_ptr(), pool.data_ptr() + v_offset
            backend.run_kernel(alib, args, batch.paged)
            kernels._check(o_f(o_m, attn.data_ptr(), T, H * d, a.data_ptr(), m), "linear")
            norm = layer.post_norm
            flib.selfseek_add_rms_norm(residual.data_ptr(), m, a.data_ptr(), m, norm.weight.data_ptr(), x.data_ptr(),
                                       T, m, norm.eps)
            kernels._check(gu_f(gu_m, x.data_ptr(), T, m, gate_up.data_ptr(), 2 * inter), "linear")
            act = F.silu(gate) * up  # as MLP.forward computes it (torch's SiLU)
            kernels._check(down_f(down_m, act.data_ptr(), T, inter, mlp_out.data_ptr(), m), "linear")
            mlp_prev = mlp_out.data_ptr()
        residual.add_(mlp_out)
        return residual
