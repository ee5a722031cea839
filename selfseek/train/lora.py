"""LoRA (Hu et al. 2021) and QLoRA (Dettmers et al. 2023) on every model selfseek serves: y = W x + (alpha / r) B A x.

Adapted parts:
- nn.Linear layers (attention, dense MLPs, shared experts) named in `targets` (their last name component);
- the routed experts (`experts=True`): per-expert A [E, r, in] and B [E, out, r] on each of the gate / up / down
  stacks, computed expert by expert beside the frozen stack;
- the router weight, trained in full when `train_router=True` (its aux-loss-free bias never is).
The multi-token-prediction module is left alone (transformers and peft have no such layer).

The base can be float or quantized (models/quant.py int8 / int4 blocks: QLoRA): frozen quantized layers stay
packed and get a backward pass that dequantizes one layer at a time, so gradients reach the adapters below them.
A is random, B starts at zero, so training starts from the base model exactly.

Adapters are saved in peft's format: adapter_config.json + adapter_model.safetensors with keys
`base_model.model.{HF module}.lora_A.weight` / `.lora_B.weight`, target_modules the HF leaf names. Routed experts
are saved one expert at a time under the released checkpoints' names (`mlp.experts.{e}.gate_proj`), which peft
(>= 0.21) converts to transformers 5's fused `gate_up_proj` / `down_proj` expert parameters on load; the router as
`mlp.gate.weight` with `modules_to_save: ["gate"]`. Written to a temporary folder and renamed: never half-written.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from selfseek.models.lora_serving import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, LoRAError, read_peft_folder
from selfseek.models.moe import Experts, Gate
from selfseek.models.quant import HalfLinear, QuantEmbedding, QuantLinear, QuantStack
from selfseek.train.config import TrainConfigError

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(lora_A|lora_B)\.weight$")
_LINEAR_KEY = re.compile(r"^(.*)\.(lora_A|lora_B)\.weight$")


# ---- frozen bases that pass gradients through ---------------------------------------------------------


def float_weight(layer: nn.Module, index: int | None) -> torch.Tensor:
    """The dequantized (or widened 16-bit) weight [out, in] of a frozen layer, or expert `index` of a stack."""
    if isinstance(layer, QuantStack):
        from selfseek import kernels

        if isinstance(layer.bits, str):  # a packed format (GGUF K-quant, FP8, FP4): kernels.Packed
            return kernels.to_float(layer.packed[index])
        q, d, m = layer.packed
        return kernels.to_float((q[index], d[index], None if m is None else m[index]))
    return layer.weight.detach().float()


class _FrozenMatmul(torch.autograd.Function):
    """y = layer(x) through the layer's own (packed, no-grad) kernel; dx = dy W with W dequantized for the backward
    only, one layer at a time, so the quantized base never exists in float as a whole."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module, index: int | None, fn) -> torch.Tensor:
        ctx.layer, ctx.index = layer, index
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = float_weight(ctx.layer, ctx.index)
        return (grad.float() @ w).to(grad.dtype), None, None, None


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


class _GradLinear:
    """Mixed into QuantLinear / QuantEmbedding / HalfLinear by `differentiable_base`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fwd = super().forward  # type: ignore[misc]
        return _FrozenMatmul.apply(x, self, None, fwd) if _needs_grad(x) else fwd(x)


class _GradStack:
    """Mixed into QuantStack: expert `index`'s product passes gradients to x."""

    def linear(self, index: int, x: torch.Tensor) -> torch.Tensor:
        fwd = super().linear  # type: ignore[misc]
        if not _needs_grad(x):
            return fwd(index, x)
        return _FrozenMatmul.apply(x, self, index, lambda h: fwd(index, h))


_GRAD_CLASSES: dict[type, type] = {}


def differentiable_base(model: nn.Module) -> nn.Module:
    """Give every frozen packed layer (int8/int4 blocks, 16-bit storage) a backward pass to its input, in place.
    HalfLinear's bias (if any) is a float parameter and already differentiable through the `+`."""
    for m in model.modules():
        cls = type(m)
        if cls in _GRAD_CLASSES.values():
            continue
        mixin = _GradStack if cls is QuantStack else _GradLinear if cls in (QuantLinear, QuantEmbedding,
                                                                              HalfLinear) else None
        if mixin is not None:
            if cls not in _GRAD_CLASSES:
                _GRAD_CLASSES[cls] = type(cls.__name__, (mixin, cls), {})
            m.__class__ = _GRAD_CLASSES[cls]
    return model


def _device(m: nn.Module) -> torch.device:
    return next(t for t in (*m.parameters(), *m.buffers()) if t is not None).device


# ---- adapted layers ---------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float):
        super().__init__()
        self.base, self.r, self.alpha = base, r, alpha
        self.scale = alpha / r
        dev = _device(base)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=dev)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=dev)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        base.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A(x.to(self.lora_A.weight.dtype))
        return self.base(x) + (self.lora_B(a) * self.scale).to(x.dtype)

    def delta(self) -> torch.Tensor:
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight, for code that reads `.weight` directly (MLA's absorbed decode)."""
        return float_weight(self.base, None) + self.delta()

    def merged(self) -> nn.Linear:
        bias = getattr(self.base, "bias", None)
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=_device(self.base),
                        dtype=self.lora_A.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight)
            if bias is not None:
                out.bias.copy_(bias)
        return out.requires_grad_(False)


class LoRAExperts(nn.Module):
    """Routed experts with per-expert adapters: expert e's projection p is W_e x + scale B_e A_e x."""

    def __init__(self, base: Experts, r: int, alpha: float, projs: tuple[str, ...] = EXPERT_PROJS):
        super().__init__()
        self.base, self.r, self.alpha, self.scale = base, r, alpha, alpha / r
        self.n_experts = base.n_experts
        dev = _device(base)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for p in projs:
            e, out_f, in_f = getattr(base, p).shape
            a = torch.empty(e, r, in_f, device=dev)
            for i in range(e):
                nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))
            self.lora_A[p] = nn.Parameter(a)
            self.lora_B[p] = nn.Parameter(torch.zeros(e, out_f, r, device=dev))
        base.requires_grad_(False)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # The per-expert torch path of Experts (the fused kernels know nothing of adapters), with _linear below.
        return Experts._forward_torch(self, x, weights, ids)

    def _linear(self, proj: str, e: int, h: torch.Tensor) -> torch.Tensor:
        y = self.base._linear(proj, e, h)
        if proj in self.lora_A:
            a, b = self.lora_A[proj][e], self.lora_B[proj][e]
            y = y + ((h.to(a.dtype) @ a.T) @ b.T * self.scale).to(y.dtype)
        return y

    def delta(self, proj: str) -> torch.Tensor:
        return self.scale * (self.lora_B[proj] @ self.lora_A[proj])

    def merged(self) -> Experts:
        """Float expert stacks holding W_e + scale B_e A_e (a quantized base is dequantized)."""
        out = self.base
        for p in EXPERT_PROJS:
            w = getattr(out, p)
            if isinstance(w, QuantStack):
                w = torch.stack([float_weight(w, e) for e in range(w.n)])
            w = w.detach().float() if p not in self.lora_A else w.detach().float() + self.delta(p).detach()
            delattr(out, p)
            setattr(out, p, nn.Parameter(w, requires_grad=False))
        return out


# ---- applying, saving, loading ---------------------------------------------------------------------


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _linear_like(m: nn.Module) -> bool:
    return type(m) in (nn.Linear, QuantLinear, HalfLinear) or type(m) in (
        _GRAD_CLASSES.get(QuantLinear), _GRAD_CLASSES.get(HalfLinear))


def apply_lora(
    model: nn.Module,
    r: int,
    alpha: float,
    targets: list[str],
    *,
    experts: bool = False,
    train_router: bool = False,
    only: set[str] | None = None,
    training: bool = True,
) -> list[str]:
    """Wrap the linear layers whose last name component is in `targets` (and, with `experts`, the routed expert
    stacks); freeze everything but the adapters (and the router weights with `train_router`). `only`: wrap exactly
    these module names instead (loading an adapter file). `training`: packed base layers get their backward pass
    (`differentiable_base`); off for inference, where they keep their exact classes (fused q/k/v and gate/up
    kernels). Returns the wrapped module names."""
    if r <= 0:
        raise TrainConfigError(f"lora.r must be positive, got {r}")
    model.requires_grad_(False)
    if training:
        differentiable_base(model)
    wrapped = []
    for name, module in list(model.named_modules()):
        if name.startswith("mtp."):
            continue  # the MTP module has no counterpart in transformers / peft
        chosen = name in only if only is not None else None
        if _linear_like(module) and (chosen if chosen is not None else name.rsplit(".", 1)[-1] in targets):
            _set(model, name, LoRALinear(module, r, alpha))
            wrapped.append(name)
        elif isinstance(module, Experts) and (chosen if chosen is not None else experts):
            _set(model, name, LoRAExperts(module, r, alpha))
            wrapped.append(name)
    if train_router:
        for name, module in model.named_modules():
            if isinstance(module, Gate) and not name.startswith("mtp."):
                module.weight.requires_grad_(True)
    if not wrapped:
        raise TrainConfigError(
            f"lora.targets {targets}{' and lora.experts' if experts else ''}: no layer of the model has such a name")
    return wrapped


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's names (routed experts one by one, the router if it trains)."""
    out: dict[str, torch.Tensor] = {}

    def put(key: str, t: torch.Tensor) -> None:
        out[PEFT_PREFIX + key] = t.detach().to("cpu", torch.float32).contiguous().clone()

    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            put(f"{name}.lora_A.weight", m.lora_A.weight)
            put(f"{name}.lora_B.weight", m.lora_B.weight)
        elif isinstance(m, LoRAExperts):
            for p in m.lora_A:
                for e in range(m.n_experts):
                    put(f"{name}.{e}.{p}.lora_A.weight", m.lora_A[p][e])
                    put(f"{name}.{e}.{p}.lora_B.weight", m.lora_B[p][e])
        elif isinstance(m, Gate) and m.weight.requires_grad and not name.startswith("mtp."):
            put(f"{name}.weight", m.weight)  # the whole router, as peft's modules_to_save stores a module
            if hasattr(m, "e_score_correction_bias"):
                put(f"{name}.e_score_correction_bias", m.e_score_correction_bias)
    return out


def _adapted(model: nn.Module) -> list[LoRALinear | LoRAExperts]:
    return [m for m in model.modules() if isinstance(m, LoRALinear | LoRAExperts)]


def save_adapter(model: nn.Module, out_dir: str | Path, targets: list[str] | None = None, base: str = "") -> Path:
    """Write the adapter folder (peft format) atomically: built in a temporary folder beside it, then renamed."""
    layers = _adapted(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save")
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if any(isinstance(m, LoRAExperts) for m in layers):
        names |= set(EXPERT_PROJS)
    router = any(isinstance(m, Gate) and m.weight.requires_grad for m in model.modules())
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": layers[0].r, "lora_alpha": layers[0].alpha,
        "target_modules": sorted(names), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": ["gate"] if router else None, "base_model_name_or_path": str(base),
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
    }
    from selfseek.train.export import write_atomically

    def write(tmp: Path) -> None:
        save_file(adapter_state(model), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")

    return write_atomically(out_dir, write)


def _read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The folder (models/lora_serving.read_peft_folder), checked for what apply_lora builds: one r and alpha."""
    try:
        cfg, tensors = read_peft_folder(adapter_dir)
    except LoRAError as e:
        raise TrainConfigError(str(e)) from None
    cfg_file = adapter_dir / ADAPTER_CONFIG
    for key in ("r", "target_modules"):
        if key not in cfg:
            raise TrainConfigError(f"{cfg_file}: no {key!r} field")
    if not isinstance(cfg["r"], int) or isinstance(cfg["r"], bool) or cfg["r"] <= 0:
        raise TrainConfigError(f"{cfg_file}: field 'r' must be a positive integer, got {cfg['r']!r}")
    if cfg.get("use_rslora"):
        raise TrainConfigError(f"{cfg_file}: field 'use_rslora' is {cfg['use_rslora']!r}: rsLoRA scaling "
                               "(alpha / sqrt(r)) cannot be trained or merged here")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise TrainConfigError(f"{cfg_file}: field {key!r}: per-module ranks and alphas cannot be trained or "
                                   "merged here")
    return cfg, tensors


def load_adapter(model: nn.Module, adapter_dir: str | Path, training: bool = False) -> nn.Module:
    """Wrap `model` where the adapter file has tensors and load them; every tensor must fit this model (a shape or
    name that does not is an error naming the file and the tensor: an adapter of another base model). `training`:
    to train further (see apply_lora)."""
    adapter_dir = Path(adapter_dir)
    cfg, tensors = _read_adapter(adapter_dir)
    where = adapter_dir / ADAPTER_WEIGHTS
    modules = dict(model.named_modules())
    only, router = set(), []
    for key in tensors:
        name = key.removeprefix(PEFT_PREFIX)
        if m := _EXPERT_KEY.match(name):
            only.add(m.group(1))
        elif m := _LINEAR_KEY.match(name):
            only.add(m.group(1))
        elif name.endswith(".gate.weight") and isinstance(modules.get(name.removesuffix(".weight")), Gate):
            router.append(name)
        elif name.endswith(".gate.e_score_correction_bias") and isinstance(
                modules.get(name.rsplit(".", 1)[0]), Gate):
            pass
        else:
            raise TrainConfigError(f"{where}: tensor {key!r} is not a LoRA weight of this model (another base?)")
    for name in sorted(only):
        m = modules.get(name)
        if not (isinstance(m, Experts) or _linear_like(m)):
            raise TrainConfigError(f"{where}: adapter tensors for {name!r}, which this model has no linear layer "
                                   f"or expert stack named so (an adapter of another base model?)")
    apply_lora(model, cfg["r"], float(cfg.get("lora_alpha", 8)), cfg["target_modules"], only=only, training=training)
    own = {PEFT_PREFIX + k: v for k, v in model.state_dict().items()}
    own |= _expert_views(model)
    with torch.no_grad():
        for key, t in tensors.items():
            if key not in own:
                raise TrainConfigError(f"{where}: tensor {key!r} has no place in this model (another base?)")
            if own[key].shape != t.shape:
                raise TrainConfigError(
                    f"{where}: tensor {key!r} has shape {list(t.shape)}, this model needs {list(own[key].shape)} "
                    f"(an adapter of another base model?)")
            own[key].copy_(t)
        for name in router:
            model.get_submodule(name.removesuffix(".weight")).weight.requires_grad_(True)
    expected = set(adapter_state(model))
    missing = sorted(expected - set(tensors))
    missing = [k for k in missing if not k.endswith(".e_score_correction_bias")]  # optional beside the router
    if missing:
        raise TrainConfigError(f"{where}: the adapter lacks tensor {missing[0]!r}")
    return model


def _expert_views(model: nn.Module) -> dict[str, torch.Tensor]:
    """peft names of each expert's A and B -> views into the LoRAExperts stacks (for loading in place)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRAExperts):
            for p in m.lora_A:
                for e in range(m.n_experts):
                    out[f"{PEFT_PREFIX}{name}.{e}.{p}.lora_A.weight"] = m.lora_A[p].data[e]
                    out[f"{PEFT_PREFIX}{name}.{e}.{p}.lora_B.weight"] = m.lora_B[p].data[e]
    return out


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with its adapters merged (the model itself keeps training). Kernel views cached on packed
    layers (ctypes structs, remade on demand) are dropped first: they cannot be copied."""
    for m in model.modules():
        m.__dict__.pop("_prepared", None)
    return merge_lora(copy.deepcopy(model))


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every adapted layer by a plain float one holding W + (alpha / r) B A (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear | LoRAExperts):
            _set(model, name, module.merged())
    return model
