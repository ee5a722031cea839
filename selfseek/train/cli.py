"""`selfseek train ...` and `python -m selfseek.train ...` (also under torchrun for data parallelism).

    selfseek train pretrain --config tiny.yaml --set train.steps=500 --set data.train=corpus/
    selfseek train sft --config sft.yaml
    selfseek train grpo --config grpo.yaml
    selfseek train dpo --set base=runs/sft/final --set data.train=pairs.jsonl
    selfseek train export --checkpoint runs/x/checkpoints/step_0000500 --out runs/x/hf
    selfseek train merge --base BASE --adapter runs/x/adapter --out runs/x/merged --gguf q8_0
    selfseek train make-data arithmetic --n 2000 --out arithmetic.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys


def add_train_parser(sub) -> None:
    """Register `train` and its jobs on an argparse subparsers object."""
    t = sub.add_parser("train", help="pretrain, fine-tune (SFT, LoRA) or reinforce (GRPO) small models")
    jobs = t.add_subparsers(dest="job", required=True)
    for job, text in (("pretrain", "pretrain a DeepSeek-V3-shaped model from scratch"),
                      ("sft", "supervised fine-tuning on chat JSONL (optionally LoRA)"),
                      ("grpo", "GRPO on a verifiable task"),
                      ("dpo", "DPO on preference pairs (JSONL of prompt / chosen / rejected)")):
        p = jobs.add_parser(job, help=text)
        p.add_argument("--config", help="YAML, TOML or JSON config file")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.steps=100 (repeatable)")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.set_defaults(func=cmd_job)
    e = jobs.add_parser("export", help="write a training checkpoint as a Hugging Face-format folder")
    e.add_argument("--checkpoint", required=True, help="a checkpoints/step_N folder")
    e.add_argument("--out", required=True)
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.set_defaults(func=cmd_export)
    m = jobs.add_parser("merge", help="merge a LoRA adapter folder into its base: Hugging Face folder and/or GGUF")
    m.add_argument("--base", required=True, help="a folder, a .gguf, a hub-cache id or an Ollama name")
    m.add_argument("--adapter", required=True, help="a peft adapter folder (adapter_config.json + safetensors)")
    m.add_argument("--out", help="the merged Hugging Face folder (base must be a folder with config.json)")
    m.add_argument("--gguf", action="append", default=[], metavar="TYPE",
                   help="also write merged.TYPE.gguf (f32, f16, bf16, q8_0, q4_0, q4_1, q4_k; repeatable)")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    m.set_defaults(func=cmd_merge)
    d = jobs.add_parser("make-data", help="write a built-in task's data set")
    d.add_argument("task", choices=["arithmetic"])
    d.add_argument("--n", type=int, default=2000)
    d.add_argument("--out", required=True)
    d.add_argument("--format", choices=["chat", "prompts"], default="chat")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-operand", type=int, default=9)
    d.add_argument("--ops", default="+")
    d.set_defaults(func=cmd_make_data)


def cmd_job(args: argparse.Namespace) -> int:
    from selfseek.train.config import load_config, to_dict

    cfg = load_config(args.job, args.config, args.overrides)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    if args.job == "pretrain":
        from selfseek.train.pretrain import run_pretrain as run
    elif args.job == "sft":
        from selfseek.train.sft import run_sft as run
    elif args.job == "dpo":
        from selfseek.train.dpo import run_dpo as run
    else:
        from selfseek.train.grpo import run_grpo as run
    summary = run(cfg)
    if summary.get("rank", 0) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "rank"}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from selfseek.train.export import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.out, args.dtype))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from selfseek.train.export import merge_adapter

    if not args.out and not args.gguf:
        raise ValueError("merge: give --out and/or --gguf")
    for path in merge_adapter(args.base, args.adapter, args.out, args.gguf, args.dtype):
        print(path)
    return 0


def cmd_make_data(args: argparse.Namespace) -> int:
    from selfseek.train.tasks import Arithmetic

    task = Arithmetic(max_operand=args.max_operand, ops=args.ops)
    n = task.write_jsonl(args.out, args.n, args.seed, fmt=args.format)
    print(f"wrote {n} {args.format} records to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m selfseek.train ARGS` is `selfseek train ARGS` (the same parser and error handling)."""
    from selfseek.cli import main as selfseek_main

    return selfseek_main(["train", *(sys.argv[1:] if argv is None else argv)])
