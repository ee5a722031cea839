"""Training job configs: a YAML / TOML / JSON file plus `--set key=value` overrides -> dataclasses.

An unknown key is an error naming its dotted path (a typo must never train silently with a default),
and so is a value of the wrong type. The `model` section is the checkpoint's config.json itself; it is
checked by selfseek.config.ModelConfig, which rejects unknown fields the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class TrainConfigError(ValueError):
    """A config file, override or training input we cannot use; the message names the key or file."""


# ---- sections ---------------------------------------------------------------------------------------


@dataclass
class TokenizerConfig:
    path: str | None = None  # reuse this tokenizer folder (tokenizer.json + tokenizer_config.json)
    vocab_size: int = 4096  # else train a byte-level BPE of this size on the training corpus
    max_bytes: int = 50_000_000  # of corpus text fed to the BPE trainer


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=lambda: ["@stdlib"])  # files, folders, globs, *.jsonl; @stdlib
    valid: list[str] = field(default_factory=list)  # empty: hold out valid_fraction of the training documents
    valid_fraction: float = 0.02
    extensions: list[str] = field(default_factory=lambda: [".py"])  # files taken from folders ([] = all)
    text_key: str = "text"  # field of a JSONL record holding the document
    fim_rate: float = 0.5  # fraction of documents rewritten to PSM fill-in-the-middle (DeepSeek-Coder: 0.5)
    seq_len: int = 512
    max_docs: int | None = None  # cap on documents read (quick experiments)


@dataclass
class ChatDataConfig:
    train: list[str] = field(default_factory=list)  # JSONL files of {"messages": [...]}
    valid: list[str] = field(default_factory=list)
    valid_fraction: float = 0.05
    max_len: int = 1024  # longer conversations are truncated
    think: str = "keep"  # R1-style <think> reasoning of assistant turns: keep (learned) | drop (removed)
    pack: bool = False  # a micro-batch's conversations in one unpadded row, each attending only to itself


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine floor
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class LoopConfig:
    steps: int = 1000
    batch_size: int = 16  # global batch, in sequences, over all processes and micro-batches
    micro_batch_size: int = 4  # sequences per forward pass on one process
    bf16: bool = False  # bf16 autocast (weights and optimizer state stay fp32)
    init_std: float = 0.02
    mtp_weight: float = 0.3  # lambda of the MTP loss (V3: 0.3, then 0.1)
    seq_aux_alpha: float = 1e-4  # alpha of the sequence-wise balance loss (V3: 0.0001)
    bias_update_speed: float = 1e-3  # gamma of the aux-loss-free bias update (V3: 0.001); 0 disables it
    eval_every: int = 100
    eval_batches: int = 8  # micro-batches of validation data per evaluation
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    resume: str | None = None  # a checkpoint folder, or "auto" for the latest one under out_dir
    stop_after: int | None = None  # end this run after this step (the schedule still spans `steps`)
    shard_optimizer: bool = False  # several processes: each keeps the AdamW state of 1/world of the parameters (ZeRO-1)
    fsdp: bool = False  # several processes, full fine-tuning: parameters, gradients and AdamW state sharded (FSDP2)
    expert_parallel: bool = False  # several processes: each holds 1/world of every MoE layer's routed experts
    progress: bool = True


@dataclass
class LoraConfig:
    r: int = 0  # 0: full fine-tuning
    alpha: float = 16.0
    targets: list[str] = field(
        default_factory=lambda: ["q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    )
    experts: bool = False  # also the routed experts' gate/up/down stacks (per-expert A/B)
    train_router: bool = False  # the MoE router weights train in full beside the adapters
    quantize: int = 0  # 4 or 8: QLoRA, the frozen base kept in int4 / int8 blocks; 0: a float base


@dataclass
class TaskConfig:
    name: str = "arithmetic"
    max_operand: int = 9
    ops: str = "+"
    n_eval: int = 64  # fixed evaluation prompts


@dataclass
class GRPOLoopConfig:
    steps: int = 100
    prompts_per_step: int = 8
    group_size: int = 8  # G completions per prompt
    max_new_tokens: int = 8
    temperature: float = 1.0
    format_weight: float = 0.0  # reward = exact answer + this x the <think>...</think> format reward (R1: 1)
    engine_block_size: int = 16  # KV block size of the rollout engine (a group shares its prompt's full blocks)
    beta: float = 0.04  # KL coefficient (DeepSeekMath: 0.04)
    clip_eps: float = 0.2
    updates_per_batch: int = 1  # policy updates per sampled batch (DeepSeekMath: 1)
    eval_every: int = 10
    eval_samples: int = 8  # sampled completions per evaluation problem
    log_every: int = 1
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: str | None = None
    progress: bool = True


# ---- jobs -----------------------------------------------------------------------------------------


@dataclass
class PretrainConfig:
    out_dir: str = "runs/pretrain"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads (0: torch's default; 1 is fastest for tiny models on a busy box)
    model: dict[str, Any] = field(default_factory=dict)  # config.json fields, over TINY_V3 below
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)


@dataclass
class SFTConfig:
    base: str = ""  # model to start from, as `serve` takes it: a folder, a .gguf, a hub-cache id or an Ollama name
    out_dir: str = "runs/sft"
    gguf: list[str] = field(default_factory=list)  # also write final.{type}.gguf of the merged model: f16, q8_0...
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    data: ChatDataConfig = field(default_factory=ChatDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, min_lr=3e-5, warmup_steps=10))
    train: LoopConfig = field(
        default_factory=lambda: LoopConfig(
            steps=200, batch_size=16, mtp_weight=0.0, seq_aux_alpha=0.0, bias_update_speed=0.0, eval_every=50,
            checkpoint_every=0,
        )
    )


@dataclass
class GRPOConfig:
    base: str = ""  # the initial policy and the KL reference: a folder, a .gguf, a hub-cache id or an Ollama name
    out_dir: str = "runs/grpo"
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, min_lr=1e-4, warmup_steps=0,
                                                                   weight_decay=0.0))
    grpo: GRPOLoopConfig = field(default_factory=GRPOLoopConfig)


@dataclass
class PreferenceDataConfig:
    train: list[str] = field(default_factory=list)  # JSONL files of {"prompt", "chosen", "rejected"}
    valid: list[str] = field(default_factory=list)
    valid_fraction: float = 0.1  # of the pairs held out when `valid` is empty
    max_len: int = 1024  # tokens of prompt + response; longer pairs are an error naming their line


@dataclass
class DPOLoopConfig:
    steps: int = 100
    batch_size: int = 8  # preference pairs per step
    beta: float = 0.1  # DPO's beta: strength of the pull towards the reference
    eval_every: int = 10
    log_every: int = 1
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: str | None = None  # a checkpoint folder, or "auto"
    progress: bool = True


@dataclass
class DPOConfig:
    base: str = ""  # the initial policy and the frozen reference (with LoRA: the base without the adapters)
    out_dir: str = "runs/dpo"
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, min_lr=5e-6, warmup_steps=5,
                                                                   weight_decay=0.0))
    dpo: DPOLoopConfig = field(default_factory=DPOLoopConfig)


JOBS: dict[str, type] = {"pretrain": PretrainConfig, "sft": SFTConfig, "grpo": GRPOConfig, "dpo": DPOConfig}

# A tiny DeepSeek-V3-shaped model (MLA, sigmoid noaux_tc DeepSeekMoE, first layer dense, one MTP module):
# what `model:` fields override. vocab_size null: the tokenizer's size, rounded up to a multiple of 64.
TINY_V3: dict[str, Any] = {
    "model_type": "deepseek_v3",
    "vocab_size": None,
    "hidden_size": 256,
    "intermediate_size": 768,
    "moe_intermediate_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "q_lora_rank": 128,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
    "num_nextn_predict_layers": 1,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


# ---- loading --------------------------------------------------------------------------------------


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A .yaml/.yml, .toml or .json file -> dict."""
    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            data = _yaml().safe_load(text)
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise TrainConfigError(f"{path}: unknown config format (use .yaml, .toml or .json)")
    except (ValueError, _yaml_error()) as e:
        if isinstance(e, TrainConfigError):
            raise
        raise TrainConfigError(f"{path}: cannot parse ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrainConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b.c=value` strings into the nested dict; values parse as YAML (numbers, bools, lists, null)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise TrainConfigError(f"override {item!r}: expected key=value, e.g. train.steps=100")
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_value(raw)
    return data


def load_config(job: str, path: str | Path | None = None, overrides: list[str] | None = None):
    """The config of `job` (pretrain | sft | grpo | dpo): defaults < file < overrides."""
    if job not in JOBS:
        raise TrainConfigError(f"unknown training job {job!r}; choose one of {', '.join(JOBS)}")
    data = read_config_file(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return from_dict(JOBS[job], data, job)


def from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from `data`, recursing into dataclass fields; unknown keys are errors."""
    if not isinstance(data, dict):
        raise TrainConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
        raise TrainConfigError(f"unknown config key {where}.{k}{hint}")
    base = cls()
    kw = {}
    for name in names:
        if name not in data:
            continue
        hint, value, key = hints[name], data[name], f"{where}.{name}"
        if dataclasses.is_dataclass(hint):
            if value is not None and not isinstance(value, dict):
                raise TrainConfigError(f"config key {key}: expected a section (mapping), got {value!r}")
            kw[name] = from_dict(hint, {**dataclasses.asdict(getattr(base, name)), **(value or {})}, key)
        else:
            kw[name] = _check_type(value, hint, key)
    return dataclasses.replace(base, **kw)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _check_type(value: Any, hint: Any, key: str) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for opt in options:
        if opt is type(None) and value is None:
            return None
        origin = typing.get_origin(opt) or opt
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if origin is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (str, bool, dict) and isinstance(value, origin):
            return value
        if origin is list:
            if isinstance(value, str):
                value = [value]  # `--set data.train=corpus/` means a one-item list
            if isinstance(value, list):
                return list(value)
    raise TrainConfigError(f"config key {key}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _parse_value(raw: str) -> Any:
    raw = raw.strip()
    try:
        return _yaml().safe_load(raw) if raw else ""
    except ImportError:
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    except Exception:  # not YAML either: keep the string
        return raw


def _yaml():
    try:
        import yaml
    except ImportError:
        raise ImportError("YAML configs need PyYAML: pip install 'selfseek[train]' (or use a .toml config)") from None
    return yaml


def _yaml_error() -> type[Exception]:
    try:
        import yaml

        return yaml.YAMLError
    except ImportError:
        return ValueError
