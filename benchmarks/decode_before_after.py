"""The bench before and after: the working tree's `selfseek bench` apparatus run against a baseline commit's
engine and against the working tree's, on the same model, GGUF, dtype and threads, one after the other.

    .venv/bin/python benchmarks/decode_before_after.py                     # medium V3 Q8_0, 1 and 2 threads
    .venv/bin/python benchmarks/decode_before_after.py --baseline 75a20a6 --out /tmp/before_after -- \\
        --model /root/v3-871m/model-q8_0.gguf --threads 1,2 --repeat 3 --compare llamacpp

The baseline is checked out with `git worktree add` (default /tmp/selfseek-baseline) and imported through
PYTHONPATH, which wins over the editable install; the bench module itself is always the working tree's
selfseek/bench.py (loaded from its file), so both runs measure the same scenarios the same way. Arguments
after `--` go to `selfseek bench`. Prints both tables, then after/before for selfseek's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BENCH = ["--model", "/root/v3-871m/model-q8_0.gguf", "--dtype", "float32", "--threads", "1,2",
                 "--repeat", "3", "--compare", "llamacpp"]
# Runs the working tree's bench.py, by file, under whatever `selfseek` PYTHONPATH provides.
LOADER = """
import argparse, importlib.util, sys
spec = importlib.util.spec_from_file_location("selfseek_bench_apparatus", sys.argv[1])
bench = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
import selfseek
print("selfseek package:", selfseek.__file__, flush=True)
parser = argparse.ArgumentParser()
bench.add_parser(parser.add_subparsers())
args = parser.parse_args(["bench", *sys.argv[2:]])
raise SystemExit(args.func(args))
"""


def worktree(commit: str, path: Path) -> Path:
    if not (path / "selfseek").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit], check=True)
    else:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        want = subprocess.run(["git", "-C", str(ROOT), "rev-parse", commit], capture_output=True, text=True,
                              check=True).stdout.strip()
        if head != want:
            raise SystemExit(f"{path} holds {head[:12]}, not {commit}: remove it (git worktree remove {path})")
    return path


def baseline_compatible(bench_args: list[str]) -> list[str]:
    """Both runs read the same file, and the baseline's GGUF tokenizer predates the `joyai-llm` pre-tokenizer
    name current llama.cpp converters give DeepSeek-V3's tokenizer (llama.cpp treats it exactly as
    `deepseek-v3`): such a --model GGUF is replaced by a copy (made once, beside it) named `deepseek-v3`."""
    from selfseek.weights.gguf import GGUFFile

    out = list(bench_args)
    for i, a in enumerate(out[:-1]):
        if a not in ("--model", "--gguf") or not out[i + 1].endswith(".gguf"):
            continue
        src = Path(out[i + 1])
        if GGUFFile.open(src).metadata.get("tokenizer.ggml.pre") != "joyai-llm":
            continue
        copy = src.with_name(src.stem + ".pre-deepseek-v3.gguf")
        if not copy.exists():
            subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--pre-tokenizer", "deepseek-v3",
                            "--force", str(src), str(copy)], check=True)
        print(f"{src.name}: tokenizer.ggml.pre joyai-llm -> using {copy} (pre-tokenizer deepseek-v3) for both runs")
        out[i + 1] = str(copy)
    return out


def run(tree: Path, bench_args: list[str], json_out: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-c", LOADER, str(ROOT / "selfseek" / "bench.py"), *bench_args, "--json", str(json_out)]
    print(f"\n######## {tree}\n$ PYTHONPATH={tree} {' '.join(cmd[:2])} <loader> {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, env=env, check=True, cwd=tree)  # `python -c` puts the cwd first on sys.path
    return json.loads(json_out.read_text())


def compare(before: list[dict], after: list[dict]) -> str:
    """selfseek's figures before and after, per configuration (same order in both runs)."""
    lines = ["| config | metric | before | after | after/before |", "|---|---|---|---|---|"]
    for b, a in zip(before, after, strict=True):
        name = f"{Path(a['model']).name} t={a['threads']}"
        old = {r["metric"]: r for r in b["table"]}
        for row in a["table"]:
            prev = old.get(row["metric"], {})
            x, y = prev.get("selfseek"), row.get("selfseek")
            if x is None or y is None:
                continue
            x0, y0 = (x[0], y[0]) if isinstance(x, list) else (x, y)
            ratio = (y0 / x0 if row["higher"] else x0 / y0) if x0 and y0 else float("nan")
            fmt = (lambda v: "/".join(f"{t:.1f}" for t in v)) if isinstance(x, list) else (lambda v: f"{v:.1f}")
            lines.append(f"| {name} | {row['metric']} | {fmt(x)} | {fmt(y)} | {ratio:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default="75a20a6", help="commit before the work (default 75a20a6)")
    p.add_argument("--baseline-dir", type=Path, default=Path("/tmp/selfseek-baseline"))
    p.add_argument("--out", type=Path, default=Path("/tmp/selfseek-before-after"), help="JSON and plots go here")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: `selfseek bench` arguments")
    args = p.parse_args()
    bench_args = baseline_compatible([a for a in args.bench_args if a != "--"] or DEFAULT_BENCH)
    args.out.mkdir(parents=True, exist_ok=True)
    base = worktree(args.baseline, args.baseline_dir)
    before = run(base, [*bench_args, "--plot", str(args.out / "before.png")], args.out / "before.json")
    after = run(ROOT, [*bench_args, "--plot", str(args.out / "after.png")], args.out / "after.json")
    table = compare(before, after)
    (args.out / "before_after.md").write_text(table + "\n")
    print(f"\n######## selfseek {args.baseline} -> working tree (> 1x: faster now)\n{table}")


if __name__ == "__main__":
    main()
