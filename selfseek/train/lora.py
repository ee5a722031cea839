"""LoRA adapters (Hu et al. 2021) on the model's nn.Linear layers: y = W x + (alpha / r) B A x.

A is random, B starts at zero, so training starts from the base model exactly. Adapters are saved
PEFT-style (adapter_config.json + adapter_model.safetensors with `base_model.model.{module}.lora_A.weight`
names) and merge into the base as W' = W + (alpha / r) B A. The routed experts are stacked tensors, not
nn.Linear layers, so they are not adapted (attention, dense MLPs and shared experts are).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from selfseek.train.config import TrainConfigError

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base, self.r, self.alpha = base, r, alpha
        self.scale = alpha / r
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight, for code that reads `.weight` directly (MLA's absorbed decode)."""
        return self.base.weight + self.scale * (self.lora_B.weight @ self.lora_A.weight)

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def apply_lora(model: nn.Module, r: int, alpha: float, targets: list[str]) -> list[str]:
    """Wrap every nn.Linear whose name ends in one of `targets`; freeze everything but the adapters."""
    if r <= 0:
        raise TrainConfigError(f"lora.r must be positive, got {r}")
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, LoRALinear(module, r, alpha))
            wrapped.append(name)
    if not wrapped:
        raise TrainConfigError(f"lora.targets {targets}: no nn.Linear layer of the model has such a name")
    return wrapped


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {_PREFIX + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}


def save_adapter(model: nn.Module, out_dir: str | Path, targets: list[str], base: str = "") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layer = next(m for m in model.modules() if isinstance(m, LoRALinear))
    save_file(adapter_state(model), str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": layer.r, "lora_alpha": layer.alpha, "target_modules": targets,
           "base_model_name_or_path": base, "bias": "none", "task_type": "CAUSAL_LM"}
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Wrap `model` as the adapter's config says and load its tensors (shapes checked, named on error)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise TrainConfigError(f"{adapter_dir}: no {ADAPTER_CONFIG}")
    cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    apply_lora(model, cfg["r"], cfg["lora_alpha"], cfg["target_modules"])
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    own = model.state_dict()
    with torch.no_grad():
        for name, t in tensors.items():
            key = name.removeprefix(_PREFIX)
            if key not in own:
                raise TrainConfigError(f"{adapter_dir}: adapter tensor {name!r} has no place in this model")
            if own[key].shape != t.shape:
                raise TrainConfigError(
                    f"{adapter_dir}: adapter tensor {name!r} has shape {list(t.shape)}, the model needs "
                    f"{list(own[key].shape)} (an adapter of another base model?)"
                )
            own[key].copy_(t)
    missing = [k for k in own if ".lora_" in k and _PREFIX + k not in tensors]
    if missing:
        raise TrainConfigError(f"{adapter_dir}: adapter lacks tensor {_PREFIX + missing[0]!r}")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding W + (alpha / r) B A (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.merged())
    return model

