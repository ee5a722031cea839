"""Metrics log (one JSON object per line) and PNG plots of a run: loss, per-layer expert load, reward."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: str | Path, after_step: int) -> None:
    """On resume: drop records of steps past the checkpoint, which the resumed run will write again."""
    path = Path(path)
    if path.is_file():
        keep = [r for r in read_metrics(path) if r.get("step", 0) <= after_step] if after_step > 0 else []
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def plot_run(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """loss.png (train/val, and MTP), expert_load.png (max/mean tokens per expert, one line per MoE layer)
    and reward.png (GRPO) from the metrics log; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    out = Path(out_dir)
    written: list[Path] = []

    def series(key: str) -> tuple[list, list]:
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    def save(fig, ax, ylabel: str, name: str, legend_size: float | None = None) -> None:
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=legend_size)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    def metrics_figure(lines: tuple[tuple[str, str], ...], marked: str, ylabel: str, name: str) -> None:
        """A line per (metric key, label) that has values, `marked` with points; no figure without the first."""
        if not any(lines[0][0] in r for r in records):
            return
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in lines:
            xs, ys = series(key)
            if xs:
                ax.plot(xs, ys, label=label, marker="o" if key == marked else None, ms=3)
        save(fig, ax, ylabel, name)

    metrics_figure((("loss", "train"), ("mtp_loss", "train MTP"), ("val_loss", "validation")), "val_loss",
                   "cross-entropy (nats/token)", "loss.png")
    layers = sorted({k for r in records for k in r.get("expert_load", {})})
    if layers:
        fig, ax = plt.subplots(figsize=(7, 4))
        for layer in layers:
            pts = [(r["step"], r["expert_load"][layer]) for r in records if layer in r.get("expert_load", {})]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=layer)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        save(fig, ax, "expert load max / mean", "expert_load.png", legend_size=8)
    metrics_figure((("reward", "train (sampled)"), ("eval_reward", "eval (sampled)"), ("eval_greedy", "eval (greedy)")),
                   "eval_reward", "mean reward", "reward.png")
    return written
