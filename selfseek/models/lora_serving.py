"""Serving LoRA adapters: several PEFT-format adapters on one base model at once, each request picking one.

An adapter is a PEFT folder: `adapter_config.json` (peft_type LORA, lora_alpha, use_rslora, alpha_pattern...)
and `adapter_model.safetensors` with tensors `base_model.model.{module}.lora_A.weight` [r, in] and
`...lora_B.weight` [out, r]. Module names are Hugging Face's, which selfseek's modules keep (models/model.py),
so `model.layers.3.self_attn.q_proj` is the same layer here; q/k/v and gate/up stay separate modules that
layers.fused_rows runs as one GEMM, and the fused layer adds each part's adapter to that part's own columns.

The registry gives each adapter an index (0 is the base model) and puts its weights on the layers
(layers.set_lora); a step's rows pick their adapter by index (layers.LoRARows, built by the runner), so one
batched forward serves sequences of different adapters and of none. Each adapter has a cache key (a digest of
its weights and scaling) that the prefix cache mixes into its root key: blocks are shared only under the
same adapter.

Not served (a clear error naming the field or tensor): DoRA, LoRA biases, `modules_to_save`, embedding or
lm_head adapters, `fan_in_fan_out`, the routed experts (stacked tensors, not linear layers) and MLA's
kv_b_proj (its weight is absorbed into the attention's decode, which a per-row delta cannot follow).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from selfseek.models.layers import set_lora
from selfseek.models.quant import QuantLinear

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_TENSOR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_UNSERVED_MODULES = ("kv_b_proj",)  # weights read outside the linear forward (MLA's absorbed decode)
LoRAWeights = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module name -> (A [r, in], B [out, r], scale)


class LoRAError(ValueError):
    """An adapter folder that cannot be served on this model; the message names the file and the field."""


@dataclass
class LoRAAdapter:
    name: str
    path: Path
    index: int  # > 0; 0 is the base model
    cache_key: str  # mixed into the prefix cache's root key: a digest of the weights and the scaling
    modules: list[str] = field(default_factory=list)  # selfseek module names it adapts
    rank: int = 0
    alpha: float = 0.0


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_peft_folder(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, {tensor name: tensor} of adapter_model.safetensors) of a PEFT LoRA folder: the one
    reader of adapter folders (serving here, training's train/lora.load_adapter). Checks what no selfseek user of
    an adapter supports; LoRAError naming the file and the field otherwise. Each user checks its own limits."""
    path = Path(path)
    cfg_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.is_file():
        raise LoRAError(f"{path}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoRAError(f"{cfg_file}: cannot read it as JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise LoRAError(f"{cfg_file}: must hold a JSON object")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise LoRAError(f"{cfg_file}: field 'peft_type' is {cfg['peft_type']!r}; only LORA adapters are read")
    unsupported = [("use_dora", "DoRA"), ("fan_in_fan_out", "Conv1D (fan_in_fan_out) layers"),
                   ("lora_bias", "LoRA biases")]
    for name, what in unsupported:
        if cfg.get(name):
            raise LoRAError(f"{cfg_file}: field {name!r} is {cfg[name]!r}: {what} are not supported")
    if cfg.get("bias", "none") != "none":
        raise LoRAError(f"{cfg_file}: field 'bias' is {cfg['bias']!r}: trained biases are not supported (use 'none')")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise LoRAError(f"{cfg_file}: field 'lora_alpha' must be a number, got {alpha!r}")
    for name in ("alpha_pattern", "rank_pattern"):
        if not isinstance(cfg.get(name) or {}, dict):
            raise LoRAError(f"{cfg_file}: field {name!r} must be an object")
    if not weights_file.is_file():
        raise LoRAError(f"{path}: no {ADAPTER_WEIGHTS} (adapter_model.bin is not read: convert it to safetensors)")
    try:
        tensors = load_file(str(weights_file))
    except (OSError, SafetensorError) as e:
        raise LoRAError(f"{weights_file}: cannot read it as safetensors: {e}") from None
    return cfg, tensors


def read_adapter(path: str | Path, model: nn.Module) -> tuple[dict, LoRAWeights]:
    """(config, {selfseek module name: (A [r, in], B [out, r], scale)}) of a PEFT folder, checked against
    `model`: every tensor must name a linear layer of it with matching shapes (an adapter of another base
    model fails here, naming the tensor)."""
    cfg, tensors = read_peft_folder(path)
    cfg_file, weights_file = Path(path) / ADAPTER_CONFIG, Path(path) / ADAPTER_WEIGHTS
    if cfg.get("modules_to_save"):
        raise LoRAError(f"{cfg_file}: field 'modules_to_save' ({cfg['modules_to_save']}) replaces whole modules; "
                        "only LoRA deltas can be served per request")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        m = _TENSOR.match(name)
        if m is None:
            what = "embedding" if "lora_embedding" in key else "non-LoRA"
            raise LoRAError(f"{weights_file}: tensor {key!r} is a {what} tensor; only lora_A / lora_B weights of "
                            "linear layers can be served")
        pairs.setdefault(m["module"], {})[m["which"]] = t
    if not pairs:
        raise LoRAError(f"{weights_file}: holds no LoRA tensors")
    use_rslora = bool(cfg.get("use_rslora", False))
    alpha_default = float(cfg.get("lora_alpha", 8))
    out: LoRAWeights = {}
    for module_name, ab in sorted(pairs.items()):
        tensor = f"{PEFT_PREFIX}{module_name}.lora_{{A,B}}.weight"
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{weights_file}: {tensor} lacks lora_{({'A', 'B'} - set(ab)).pop()}")
        layer = _linear(model, module_name, weights_file, tensor)
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r or a.shape[1] != layer.in_features or (
                b.shape[0] != layer.out_features):
            raise LoRAError(f"{weights_file}: {tensor} have shapes A {list(a.shape)}, B {list(b.shape)}; the "
                            f"model's {module_name} needs A [r, {layer.in_features}], B [{layer.out_features}, r] "
                            "(an adapter of another base model?)")
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module_name, alpha_default))
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        out[module_name] = (a, b, scale)
    return cfg, out


def _linear(model: nn.Module, module_name: str, weights_file: Path, tensor: str) -> nn.Module:
    if module_name.rsplit(".", 1)[-1] in _UNSERVED_MODULES:
        raise LoRAError(f"{weights_file}: {tensor}: adapters on {module_name.rsplit('.', 1)[-1]} cannot be served "
                        "(MLA absorbs that weight into its decode attention)")
    if ".experts." in f".{module_name}." and ".shared_experts." not in f".{module_name}.":
        raise LoRAError(f"{weights_file}: {tensor}: adapters on routed experts cannot be served yet")
    try:
        layer = model.get_submodule(module_name)
    except AttributeError:
        raise LoRAError(f"{weights_file}: {tensor}: the model has no module {module_name!r} "
                        "(an adapter of another base model?)") from None
    if type(layer) not in (nn.Linear, QuantLinear):
        raise LoRAError(f"{weights_file}: {tensor}: {module_name} is a {type(layer).__name__}, not a linear layer")
    return layer


def _cache_key(weights: LoRAWeights) -> str:
    """What makes two adapters give the same KV: their tensors and scales (not their names or paths)."""
    h = hashlib.sha256(b"selfseek-lora-v1")
    for name, (a, b, scale) in sorted(weights.items()):
        h.update(f"{name}:{scale!r}:{a.dtype}:{list(a.shape)}:{list(b.shape)}".encode())
        for t in (a, b):
            h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class LoRARegistry:
    """The adapters served on one model, by name; index 0 is the base model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapters: dict[str, LoRAAdapter] = {}

    def add(self, name: str, path: str | Path) -> LoRAAdapter:
        """Load a PEFT folder and serve it as `name` (all checks pass before any layer changes)."""
        if not isinstance(name, str) or not name:
            raise LoRAError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self.adapters:
            raise LoRAError(f"adapter name {name!r} is already served (from {self.adapters[name].path})")
        cfg, weights = read_adapter(path, self.model)
        dtype, device = self.model.dtype, self.model.device
        adapter = LoRAAdapter(name, Path(path), len(self.adapters) + 1, _cache_key(weights), list(weights),
                              max(a.shape[0] for a, _, _ in weights.values()), float(cfg.get("lora_alpha", 8)))
        for module_name, (a, b, scale) in weights.items():
            owner_name = module_name.rpartition(".")[0]
            set_lora(self.model.get_submodule(module_name), self.model.get_submodule(owner_name), adapter.index,
                     a.to(device, dtype), b.to(device, dtype), scale)
        self.adapters[name] = adapter
        return adapter

    def names(self) -> list[str]:
        return list(self.adapters)

    def get(self, name: str) -> LoRAAdapter:
        """The adapter served as `name`; KeyError naming what is served otherwise."""
        try:
            return self.adapters[name]
        except KeyError:
            served = ", ".join(self.adapters) or "none"
            raise KeyError(f"no LoRA adapter named {name!r} is served (served: {served})") from None

    def __len__(self) -> int:
        return len(self.adapters)


def parse_lora_option(value: str) -> tuple[str, str]:
    """`name=PATH` (the CLI's --lora) -> (name, path); ValueError saying the form otherwise."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora takes NAME=PATH (a PEFT adapter folder), got {value!r}")
    return name, path
