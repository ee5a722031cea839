"""A trained CausalLM -> a Hugging Face-format folder that selfseek and transformers both load.

Tensor names are the released checkpoints': experts one by one
(`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`), the router as `mlp.gate.weight` plus
`mlp.gate.e_score_correction_bias` (fp32 whatever the dtype), and the MTP module as
`model.layers.{num_hidden_layers + k}.*` with its own copies of the embedding and output head
(`embed_tokens`, `shared_head.head`), as DeepSeek-V3 ships it; transformers ignores that layer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from selfseek.models.model import CausalLM
from selfseek.models.moe import Experts
from selfseek.models.quant import HalfEmbedding, HalfLinear, QuantEmbedding, QuantLinear, QuantStack
from selfseek.train.lora import float_weight
from selfseek.train.tokenizer_train import TOKENIZER_FILES

ARCHITECTURES = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v32": "DeepseekV32ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# GGUF outtypes of merged exports: those selfseek's writer can write (gguf's quantizers, and its own Q4_K).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k")
# llama.cpp pre-tokenizer names of the families' released tokenizers, for a merged GGUF of a folder base.
GGUF_PRE = {"deepseek_v3": "deepseek-v3", "deepseek_v32": "deepseek-v3", "deepseek_v2": "deepseek-llm",
            "qwen2": "qwen2", "qwen3": "qwen2", "llama": "llama-bpe"}
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
    """Write config.json, generation_config.json, model.safetensors and the tokenizer files to out_dir (all written
    in a temporary folder beside it first, then moved in, so a failure leaves nothing half-written)."""
    return write_atomically(out_dir, lambda tmp: _write_hf(model, config, tmp, tokenizer_dir, dtype))


def write_atomically(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a fresh temporary folder beside `out_dir`, then move each file it wrote into `out_dir`
    (created if needed; files already there and not rewritten stay). A failure in `write` leaves `out_dir` as it was
    and no temporary folder behind."""
    final = Path(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        final.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, final / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_hf(model: CausalLM, config: dict[str, Any], out: Path, tokenizer_dir, dtype: torch.dtype) -> None:
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


def dequantize_model(model: CausalLM) -> CausalLM:
    """Every packed (int8/int4 blocks) or 16-bit-storage weight back to an fp32 float layer, in place: what a merged
    export of a QLoRA run writes (the adapters were trained on the dequantized base, so it is the base they fit)."""
    tied = model.config.tie_word_embeddings
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantEmbedding):
                emb = nn.Embedding(child.out_features, child.in_features)
                emb.weight = nn.Parameter(float_weight(child, None), requires_grad=False)
                setattr(parent, name, emb)
            elif isinstance(child, QuantLinear | HalfLinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=getattr(child, "bias", None) is not None)
                lin.weight = nn.Parameter(float_weight(child, None), requires_grad=False)
                if lin.bias is not None:
                    lin.bias = nn.Parameter(child.bias.detach().float(), requires_grad=False)
                setattr(parent, name, lin)
            elif isinstance(child, HalfEmbedding):
                child.__class__ = nn.Embedding
                child.weight.data = child.weight.data.float()
            elif isinstance(child, Experts):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    w = getattr(child, proj)
                    if isinstance(w, QuantStack):
                        w = torch.stack([float_weight(w, e) for e in range(w.n)])
                    delattr(child, proj)
                    setattr(child, proj, nn.Parameter(w.detach().float(), requires_grad=False))
    if tied:  # one matrix, embedding and head
        model.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def export_gguf(
    model: CausalLM, path: str | Path, outtype: str = "f16", tokenizer_metadata: Mapping[str, Any] | None = None,
    name: str = "selfseek",
) -> Path:
    """A merged (adapter-free) model -> one .gguf written by selfseek's writer (weights/gguf_writer.py), through a
    temporary file renamed into place. outtype: one of GGUF_TYPES."""
    from gguf import GGMLQuantizationType

    from selfseek.weights.gguf_writer import write_gguf

    if outtype not in GGUF_TYPES:
        raise ValueError(f"GGUF outtype {outtype!r}; choose one of {', '.join(GGUF_TYPES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write_gguf(tmp, dequantize_model(model), GGMLQuantizationType[outtype.upper()], metadata=tokenizer_metadata,
                   name=name)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def tokenizer_metadata_of(base: str | Path, model_type: str, vocab_size: int | None = None) -> dict[str, Any]:
    """The `tokenizer.*` GGUF keys for a merged export: copied from a GGUF base, built from a folder base's
    tokenizer.json (llama.cpp pre-tokenizer name by family, GGUF_PRE), padded with `[PADi]` tokens to the model's
    `vocab_size` as the converter does (llama.cpp rejects a token list shorter than token_embd)."""
    from selfseek.weights.gguf import GGUFFile
    from selfseek.weights.gguf_writer import gguf_tokenizer_metadata

    base = Path(base)
    if base.is_file():
        return {k: v for k, v in GGUFFile.open(base).metadata.items() if k.startswith("tokenizer.")}
    if not (base / "tokenizer.json").is_file():
        return {}
    tc = base / "tokenizer_config.json"
    return gguf_tokenizer_metadata(base / "tokenizer.json", tc if tc.is_file() else None,
                                   GGUF_PRE.get(model_type, "default"), vocab_size)


def merge_adapter(
    base: str, adapter_dir: str | Path, out_dir: str | Path | None = None, gguf: list[str] = (),
    dtype: str = "float32",
) -> list[Path]:
    """A base model (anything `serve` loads) + a peft adapter folder -> the merged model as a Hugging Face folder
    (`out_dir`; the base must be a folder with config.json) and/or `{out_dir or adapter_dir}/merged.{type}.gguf`."""
    from selfseek.config import ConfigError
    from selfseek.stores import resolve
    from selfseek.train.config import TrainConfigError
    from selfseek.train.lora import load_adapter, merge_lora
    from selfseek.weights import CheckpointError, load_model

    try:
        path = resolve(base).path
        model, _ = load_model(base, "float32", progress=False, quantize=0, generation_config="none")
    except (CheckpointError, ConfigError) as e:
        raise TrainConfigError(f"base {base!r}: {e}") from None
    merge_lora(load_adapter(model, adapter_dir))
    written = []
    if out_dir is not None:
        if not (path / "config.json").is_file():
            raise TrainConfigError(f"base {base!r} is not a folder with config.json: a merged Hugging Face folder "
                                   "needs one (write a GGUF instead)")
        written.append(export_hf(model, read_config(path), out_dir, path, getattr(torch, dtype)))
    meta = tokenizer_metadata_of(path, model.config.model_type, model.config.vocab_size) if gguf else {}
    for t in gguf:
        written.append(export_gguf(model, Path(out_dir or adapter_dir) / f"merged.{t}.gguf", t, meta))
    return written


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
    if lora.get("quantize"):
        raise TrainConfigError(f"{path}: a QLoRA checkpoint; merge its adapter/ folder onto the base instead "
                               "(selfseek train merge)")
    if lora.get("r", 0) > 0:
        apply_lora(model, lora["r"], lora["alpha"], lora["targets"], experts=lora.get("experts", False),
                   train_router=lora.get("train_router", False))
    check_shapes(state["model"], model, str(path))
    model.load_state_dict(state["model"])
    merge_lora(model)
    return export_hf(model, job["model_config"], out_dir, job.get("tokenizer"), getattr(torch, dtype))
