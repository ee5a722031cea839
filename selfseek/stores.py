"""Models by the names people use, from where they already keep them; their generation defaults.

A model argument (LLM(...), generate, serve, bench, chat) is, in this order:
- None, "" or a short name of a model shipped as a package (`smollm2`, the default);
- a path: a checkpoint folder or a .gguf file (any part of a split GGUF);
- an Ollama name (`deepseek-r1:7b`, `deepseek-r1` = `:latest`, `user/model:tag`, `hf.co/org/repo:tag`) found in
  the local Ollama store (OLLAMA_MODELS, else ~/.ollama/models): manifests/<registry>/<namespace>/<model>/<tag>
  is a JSON manifest whose layers are blobs/sha256-<hex>; the application/vnd.ollama.image.model layer is the
  GGUF, the params layer (JSON) and the template layer (a Go template) are read too;
- a Hugging Face hub id (`deepseek-ai/DeepSeek-R1-Distill-Qwen-7B`, optionally `org/repo:Q4_K_M` to pick one
  GGUF of a GGUF repo) found in the local Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub, else
  ~/.cache/huggingface/hub) through huggingface_hub with local_files_only: nothing is ever downloaded.

Generation defaults (vLLM's `--generation-config auto`): the sampling settings a request gets for the fields it
leaves out, from generation_config.json, a GGUF's general.sampling.* keys, an Ollama params layer, or the
default model's model card; `none` (or `vllm`) turns them off.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfseek.weights.safetensors import CheckpointError

__all__ = ["ModelSource", "StoredModel", "generation_defaults", "hf_cache_dir", "list_models", "ollama_models_dir",
           "resolve"]

OLLAMA_MODEL = "application/vnd.ollama.image.model"
OLLAMA_PARAMS = "application/vnd.ollama.image.params"
OLLAMA_TEMPLATE = "application/vnd.ollama.image.template"
OLLAMA_SYSTEM = "application/vnd.ollama.image.system"
_OLLAMA_REGISTRY = "registry.ollama.ai"

# Sampling defaults of the shipped default model, as an Ollama params layer would carry them: the settings the
# SmolLM2-135M-Instruct model card generates with (model.generate(..., temperature=0.2, top_p=0.9,
# do_sample=True)); at temperature 1.0 the 135M model answers word salad.
SHIPPED_PARAMS: dict[str, dict[str, Any]] = {"smollm2": {"temperature": 0.2, "top_p": 0.9}}


@dataclass
class ModelSource:
    """Where a model argument led: the file or folder to load, and what the store said about it."""

    path: Path
    kind: str  # "shipped" | "path" | "ollama" | "hf"
    name: str  # as the user wrote it (the shipped model's short name for the default)
    ollama_params: dict[str, Any] | None = None  # the params layer, JSON
    ollama_template: str | None = None  # the template layer (a Go template; the GGUF's own jinja one is used)
    ollama_system: str | None = None


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def ollama_models_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or "~/.ollama/models").expanduser()


# ---------------------------------------------------------------- resolution


def resolve(source: str | Path | None) -> ModelSource:
    """A model argument -> the files to load (see the module docstring for the order)."""
    from selfseek.weights import DEFAULT_MODEL, LOCAL_MODELS

    name = str(source) if source is not None else ""
    if name in ("", *LOCAL_MODELS):
        short = name or DEFAULT_MODEL
        path = LOCAL_MODELS[short]()
        if not path.is_file():
            raise CheckpointError(f"{path}: model {short!r} is installed without its weights file")
        return ModelSource(path, "shipped", short)
    path = Path(name).expanduser()
    if path.exists():
        return ModelSource(path, "path", name)
    if isinstance(source, Path) or name.startswith((".", "/", "~")) or name.endswith(".gguf"):
        raise CheckpointError(f"{path}: no such file or folder")
    found = _ollama(name)
    if found is not None:
        return found
    repo, _, quant = name.partition(":")
    if repo.count("/") == 1 and not repo.startswith("hf.co/"):
        return ModelSource(_hf_snapshot(repo, quant or None), "hf", name)
    raise CheckpointError(
        f"{name}: no such file or folder, nor a model name found locally: not a shipped model "
        f"({', '.join(LOCAL_MODELS)}), not in the Ollama store ({ollama_models_dir()}: `ollama pull {name}` puts it "
        f"there), and not a Hugging Face id (org/name) of the cache ({hf_cache_dir()})"
    )


def _ollama_manifest(name: str) -> Path:
    """manifests/<registry>/<namespace>/<model>/<tag> for an Ollama name, as Ollama lays it out."""
    base, tag = name, "latest"
    if ":" in name.rsplit("/", 1)[-1]:
        base, tag = name.rsplit(":", 1)
    parts = base.split("/")
    if len(parts) == 1:
        parts = [_OLLAMA_REGISTRY, "library", parts[0]]
    elif len(parts) == 2:
        parts = [_OLLAMA_REGISTRY, *parts]
    return ollama_models_dir().joinpath("manifests", *parts, tag)


def _blob(digest: str) -> Path:
    return ollama_models_dir() / "blobs" / digest.replace(":", "-")


def _ollama(name: str) -> ModelSource | None:
    """The Ollama model `name` from the local store, or None when the store has no manifest of that name."""
    if any(c in name for c in "\\\0") or ".." in name.split("/"):
        return None
    manifest = _ollama_manifest(name)
    if not manifest.is_file():
        return None
    try:
        layers = json.loads(manifest.read_text())["layers"]
        by_type = {layer["mediaType"]: layer["digest"] for layer in layers}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest}: not a readable Ollama manifest ({e})") from None
    if OLLAMA_MODEL not in by_type:
        raise CheckpointError(f"{manifest}: Ollama model {name!r} has no {OLLAMA_MODEL} layer (a GGUF)")
    model = _blob(by_type[OLLAMA_MODEL])
    if not model.is_file():
        raise CheckpointError(f"{model}: the GGUF blob of Ollama model {name!r} is missing (`ollama pull {name}`)")

    def text(media_type: str) -> str | None:
        blob = by_type.get(media_type)
        return _blob(blob).read_text(encoding="utf-8") if blob and _blob(blob).is_file() else None

    params = text(OLLAMA_PARAMS)
    try:
        params_json = json.loads(params) if params else None
    except ValueError as e:
        raise CheckpointError(f"{_blob(by_type[OLLAMA_PARAMS])}: Ollama params layer is not JSON ({e})") from None
    return ModelSource(model, "ollama", name, params_json, text(OLLAMA_TEMPLATE), text(OLLAMA_SYSTEM))


def _hf_snapshot(repo_id: str, quant: str | None) -> Path:
    """The local snapshot folder of a hub repo (refs/main), or within it the GGUF named by `quant`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hf_cache_dir()
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        raise CheckpointError(
            f"{repo_id}: not in the Hugging Face cache ({cache}); selfseek never downloads at run time. Fetch it "
            f"with `huggingface-cli download {repo_id}` (or `hf download {repo_id}`), or pass a local path"
        ) from None
    ggufs = sorted(p for p in folder.rglob("*.gguf") if _is_first_part(p))
    if quant:
        picked = [p for p in ggufs if quant.lower() in p.name.lower()]
        if len(picked) != 1:
            raise CheckpointError(f"{folder}: {len(picked)} GGUF files match {quant!r}; the snapshot has: "
                                  f"{', '.join(p.name for p in ggufs) or 'none'}")
        return picked[0]
    if (folder / "config.json").is_file() or not ggufs:
        return folder
    if len(ggufs) > 1:
        raise CheckpointError(f"{folder}: {len(ggufs)} GGUF files; name one as {repo_id}:QUANT, from: "
                              f"{', '.join(p.name for p in ggufs)}")
    return ggufs[0]


def _is_first_part(p: Path) -> bool:
    from selfseek.weights.gguf import split_parts

    return split_parts(p)[0] == p


# ---------------------------------------------------------------- generation defaults

# Where each SamplingParams field comes from, per source.
_HF_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
            "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
_GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
              "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
              "general.sampling.penalty_repeat": "repetition_penalty"}
_OLLAMA_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
                "frequency_penalty": "frequency_penalty", "num_predict": "max_tokens", "seed": "seed", "stop": "stop"}
GENERATION_CONFIG_MODES = ("auto", "none", "vllm")


def generation_defaults(source: ModelSource, mode: str | Path = "auto",
                        gguf_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """SamplingParams fields a request that leaves them out gets (vLLM's --generation-config).

    mode "auto": the model's own: generation_config.json of a checkpoint folder, a GGUF's general.sampling.*
    keys, then an Ollama params layer over them, or the shipped model's card settings. "none" / "vllm": none (the
    server's and SamplingParams' own defaults). A folder path: its generation_config.json.
    """
    mode = str(mode)
    if mode in ("none", "vllm"):
        return {}
    if mode != "auto":
        folder = Path(mode).expanduser()
        if not (folder / "generation_config.json").is_file():
            raise CheckpointError(f"{folder}: --generation-config must be auto, none, vllm or a folder with "
                                  "generation_config.json")
        return _from_generation_config(folder / "generation_config.json")
    out: dict[str, Any] = {}
    if source.path.is_dir() and (source.path / "generation_config.json").is_file():
        out.update(_from_generation_config(source.path / "generation_config.json"))
    for key, name in _GGUF_KEYS.items():
        if gguf_metadata and gguf_metadata.get(key) is not None:
            out[name] = gguf_metadata[key]
    if source.kind == "shipped":
        out.update(SHIPPED_PARAMS.get(source.name, {}))
    for key, name in _OLLAMA_KEYS.items():
        if source.ollama_params and source.ollama_params.get(key) is not None:
            value = source.ollama_params[key]
            out[name] = [value] if name == "stop" and isinstance(value, str) else value
    return out


def _from_generation_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    return {name: cfg[key] for key, name in _HF_KEYS.items() if cfg.get(key) is not None}


# ---------------------------------------------------------------- `selfseek list`


@dataclass
class StoredModel:
    name: str  # what to pass as the model argument
    store: str  # "shipped" | "ollama" | "hf" | "folder"
    path: Path
    size: int  # bytes on disk
    architecture: str = "?"
    quantization: str = "?"
    notes: list[str] = field(default_factory=list)


def list_models(folders: list[str | Path] = ()) -> list[StoredModel]:
    """Every model selfseek can find: the shipped default, the Ollama store, the HF cache, and `folders`
    (each a model itself or a folder of models)."""
    from selfseek.weights import LOCAL_MODELS

    out: list[StoredModel] = []
    for short, find in LOCAL_MODELS.items():
        try:
            path = find()
        except CheckpointError:
            continue
        if path.is_file():
            out.append(_describe(short, "shipped", path))
    out += _list_ollama()
    out += _list_hf()
    for folder in map(Path, folders):
        candidates = [folder] if _looks_like_model(folder) else sorted(folder.iterdir()) if folder.is_dir() else []
        out += [_describe(str(p), "folder", p) for p in candidates if _looks_like_model(p)]
    return out


def _looks_like_model(p: Path) -> bool:
    if p.is_dir():
        return (p / "config.json").is_file()
    return p.suffix == ".gguf" and _is_first_part(p)


def _list_ollama() -> list[StoredModel]:
    root = ollama_models_dir() / "manifests"
    out = []
    for manifest in sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []:
        registry, *rest = manifest.relative_to(root).parts
        if registry == _OLLAMA_REGISTRY and rest[0] == "library":
            name = f"{rest[1]}:{rest[2]}"
        elif registry == _OLLAMA_REGISTRY:
            name = f"{'/'.join(rest[:-1])}:{rest[-1]}"
        else:
            name = f"{registry}/{'/'.join(rest[:-1])}:{rest[-1]}"
        try:
            src = _ollama(name)
        except CheckpointError as e:
            out.append(StoredModel(name, "ollama", manifest, 0, notes=[str(e)]))
            continue
        if src is not None:
            out.append(_describe(name, "ollama", src.path))
    return out


def _list_hf() -> list[StoredModel]:
    cache = hf_cache_dir()
    if not cache.is_dir():
        return []
    from huggingface_hub import scan_cache_dir

    out = []
    for repo in sorted(scan_cache_dir(cache).repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        try:
            path = _hf_snapshot(repo.repo_id, None)
        except CheckpointError as e:  # e.g. a GGUF repo with several quantizations: list each
            folder = next(iter(repo.revisions)).snapshot_path if repo.revisions else None
            ggufs = sorted(p for p in folder.rglob("*.gguf") if _is_first_part(p)) if folder else []
            if not ggufs:
                out.append(StoredModel(repo.repo_id, "hf", cache, repo.size_on_disk, notes=[str(e)]))
            out += [_describe(f"{repo.repo_id}:{_quant_tag(p)}", "hf", p) for p in ggufs]
            continue
        out.append(_describe(repo.repo_id, "hf", path))
    return out


def _quant_tag(p: Path) -> str:
    from selfseek.weights.gguf import split_parts

    stem = p.name[: -len(".gguf")]
    if len(split_parts(p)) > 1:
        stem = stem.rsplit("-", 3)[0]
    return stem.rsplit("-", 1)[-1].rsplit(".", 1)[-1]


def _describe(name: str, store: str, path: Path) -> StoredModel:
    """Size, architecture and quantization of a model folder or GGUF, read from its headers only."""
    m = StoredModel(name, store, path, 0)
    try:
        if path.is_dir():
            m.size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            cfg = json.loads((path / "config.json").read_text())
            m.architecture = str(cfg.get("model_type", "?"))
            q = cfg.get("quantization_config") or {}
            m.quantization = (f"{q.get('quant_method')}" + (f" {q['bits']}-bit" if q.get("bits") else "")) if q \
                else str(cfg.get("torch_dtype") or cfg.get("dtype") or "?")
            return m
        from selfseek.weights.gguf import GGUFFile, split_parts

        parts = split_parts(path)
        m.size = sum(p.stat().st_size for p in parts if p.is_file())
        g = GGUFFile.open(path)
        m.architecture = str(g.architecture)
        types = Counter(t.type.name for t in g.tensors.values() if len(t.shape) >= 2)
        m.quantization = ", ".join(f"{k} x{v}" for k, v in types.most_common(3))
        if len(parts) > 1:
            m.notes.append(f"{len(parts)} parts")
    except (OSError, ValueError) as e:
        m.notes.append(f"unreadable: {e}")
    return m


def format_table(models: list[StoredModel]) -> str:
    rows = [("NAME", "STORE", "SIZE", "ARCH", "QUANTIZATION", "PATH")]
    for m in models:
        path = str(m.path) + (f"  ({'; '.join(m.notes)})" if m.notes else "")
        rows.append((m.name, m.store, _size(m.size), m.architecture, m.quantization, path))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5] for r in rows)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
