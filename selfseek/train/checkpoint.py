"""Training checkpoints for exact resume: model, optimizer, step, data position and every RNG state.

Layout: {out_dir}/checkpoints/step_{N:07d}/ with state.pt (model + optimizer + counters + the job config,
written by rank 0) and rng_{rank}.pt (each process's RNG states). The learning-rate schedule is a function
of the step, so the step is its whole state. Shapes are checked before loading, so a checkpoint of another
model is an error that names the first tensors that differ.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from selfseek.train.config import TrainConfigError


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:07d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    counters: dict[str, Any],
    job_config: dict[str, Any],
    rank: int = 0,
    keep: int = 0,
    states: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> Path:
    """Write step `step`'s checkpoint; with keep > 0, delete all but the newest `keep` (rank 0 only).
    states: (model, optimizer) state dicts gathered by the caller (sharded training), instead of
    model.state_dict() and optimizer.state_dict()."""
    path = checkpoint_dir(out_dir, step)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), path / f"rng_{rank}.pt")
    if rank == 0:
        model_state, optimizer_state = states or (model.state_dict(), optimizer.state_dict())
        state = {
            "model": model_state,
            "optimizer": optimizer_state,
            "counters": {"step": step, **counters},
            "config": job_config,
        }
        tmp = path / "state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(path / "state.pt")  # a run killed mid-write leaves no half checkpoint behind
        if keep > 0:
            for old in list_checkpoints(out_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    return path


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if (p / "state.pt").is_file()) if root.is_dir() else []


def resolve_resume(resume: str | None, out_dir: str | Path) -> Path | None:
    """`resume`: None, "auto" (the newest checkpoint under out_dir, if any) or a checkpoint folder."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.pt").is_file():
        raise TrainConfigError(f"train.resume {resume!r}: not a checkpoint folder (no state.pt)")
    return path


def check_shapes(state: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Raise a TrainConfigError naming the tensors whose shapes or presence differ."""
    own = model.state_dict()
    problems = []
    for name, t in state.items():
        if name not in own:
            problems.append(f"unexpected tensor {name!r}")
        elif tuple(t.shape) != tuple(own[name].shape):
            implied = list(own[name].shape)
            problems.append(f"tensor {name!r} has shape {list(t.shape)}, the model config implies {implied}")
    problems += [f"missing tensor {name!r}" for name in own if name not in state]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise TrainConfigError(
            f"{source}: checkpoint does not fit this model: {'; '.join(problems[:3])}{more}. "
            "Was it written with a different model config?"
        )


def load_checkpoint_state(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, rank: int = 0,
    load: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG states; return the counters (step, position, ...).
    load(model_state, optimizer_state): how to put them in place (sharded training), instead of load_state_dict."""
    path = Path(path)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    if load is not None:
        load(state["model"], state["optimizer"])
    else:
        check_shapes(state["model"], model, str(path))
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    rng = path / f"rng_{rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    return state["counters"]


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)["config"]
