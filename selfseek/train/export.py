"""A trained CausalLM -> a Hugging Face-format folder that selfseek and transformers both load.

Tensor names are the released checkpoints': experts one by one
(`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`), the router as `mlp.gate.weight` plus
`mlp.gate.e_score_correction_bias` (fp32 whatever the dtype), and the MTP module as
`model.layers.{num_hidden_layers + k}.*` with its own copies of the embedding and output head
(`embed_tokens`, `shared_head.head`), as DeepSeek-V3 ships it; transformers ignores that layer.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from selfseek.models.model import CausalLM
from selfseek.train.tokenizer_train import TOKENIZER_FILES

ARCHITECTURES = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v32": "DeepseekV32ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "llama": "LlamaForCausalLM",
}
_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_MTP = re.compile(r"^mtp\.(\d+)\.(?:block\.)?(.*)$")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_state_dict(model: CausalLM, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our parameter names -> checkpoint tensor names (contiguous copies, on the CPU)."""
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor) -> None:
        keep_fp32 = ".mlp.gate." in name  # router weight and bias stay fp32, as in the real checkpoints
        t = t.detach().to("cpu", torch.float32 if keep_fp32 else dtype)
        out[name] = t.contiguous().clone()

    for name, t in model.state_dict().items():
        if ".lora_" in name or name.endswith(".base.weight"):
            raise ValueError(f"model has LoRA adapters ({name}); merge them before exporting")
        if m := _MTP.match(name):
            name = f"model.layers.{n_layers + int(m.group(1))}.{m.group(2)}"
        if m := _EXPERTS.match(name):
            for e in range(t.shape[0]):
                put(f"{m.group(1)}.{e}.{m.group(2)}.weight", t[e])
        elif not (cfg.tie_word_embeddings and name == "lm_head.weight"):
            put(name, t)
    for k in range(len(model.mtp)):
        put(f"model.layers.{n_layers + k}.embed_tokens.weight", model.model.embed_tokens.weight)
        put(f"model.layers.{n_layers + k}.shared_head.head.weight", model.lm_head.weight)
    return out


def export_hf(
    model: CausalLM,
    config: dict[str, Any],
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write config.json, generation_config.json, model.safetensors and the tokenizer files to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(model, dtype)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = {k: v for k, v in config.items() if k not in ("torch_dtype", "dtype", "architectures")}
    cfg = {"architectures": [ARCHITECTURES[cfg["model_type"]]], **cfg, "torch_dtype": _DTYPE_NAMES[dtype]}
    if cfg["model_type"] in ("deepseek_v3", "deepseek_v32"):
        cfg["num_nextn_predict_layers"] = len(model.mtp)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if cfg.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != out.resolve():
        for f in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / f).is_file():
                shutil.copy(Path(tokenizer_dir) / f, out / f)
    return out


def read_config(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "config.json").read_text())


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """A training checkpoint (checkpoints/step_N) -> Hugging Face-format folder, LoRA merged."""
    from selfseek.config import ModelConfig
    from selfseek.train.build import init_weights
    from selfseek.train.checkpoint import check_shapes
    from selfseek.train.config import TrainConfigError
    from selfseek.train.lora import apply_lora, merge_lora

    path = Path(checkpoint)
    if not (path / "state.pt").is_file():
        raise TrainConfigError(f"{path}: not a training checkpoint (no state.pt)")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    job = state["config"]
    model = CausalLM(ModelConfig.from_dict(job["model_config"], source=f"{path} model config"))
    init_weights(model, 0.0)
    lora = job.get("config", {}).get("lora", {})
    if lora.get("r", 0) > 0:
        apply_lora(model, lora["r"], lora["alpha"], lora["targets"])
    check_shapes(state["model"], model, str(path))
    model.load_state_dict(state["model"])
    merge_lora(model)
    return export_hf(model, job["model_config"], out_dir, job.get("tokenizer"), getattr(torch, dtype))
