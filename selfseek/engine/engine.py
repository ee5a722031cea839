"""LLMEngine: the step loop. Requests in; each step schedules, runs the model once, samples, and turns new
tokens into deltas (token ids, logprobs, finish reasons). Text and stop strings are the output processor's
(engine/output_processor.py), which runs after the step and stops a completion a stop string ended.

A failure belongs to one request: an error while adding it, in its logits processors, penalties,
sampling, or in a forward pass it is part of (found by re-running the
step's sequences one at a time, which rewrites the same KV slots) fails that request alone with a
RequestFailed on its final delta; its blocks are freed and the others continue.

Not thread-safe by itself: the server drives it through engine/async_engine.py, LLM.generate directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass

import torch

from selfseek import kernels
from selfseek.engine.async_engine import RequestDelta
from selfseek.engine.disk_cache import open_disk_cache
from selfseek.engine.errors import EngineDead, EngineError, Overloaded, RequestError, RequestFailed
from selfseek.engine.kv_cache import BlockManager, window_blocks_needed
from selfseek.engine.runner import ModelRunner, kv_bytes_per_token
from selfseek.engine.sampler import sample
from selfseek.engine.scheduler import Scheduled, Scheduler
from selfseek.engine.sequence import Sequence
from selfseek.engine.speculative import SpeculativeRunner
from selfseek.models.lora_serving import LoRARegistry
from selfseek.models.model import CausalLM
from selfseek.models.quant import interleave_q8_weights
from selfseek.sampling_params import SamplingParams
from selfseek.tokenizer import Tokenizer


@dataclass
class EngineArgs:
    block_size: int = 64
    kv_cache_memory: int | None = None  # bytes for the paged cache; None: a share of free memory
    kv_cache_fraction: float = 0.15  # that share, at most kv_cache_max_default bytes
    kv_cache_max_default: int = 2 << 30
    max_num_batched_tokens: int = 512  # per-step token budget (the prefill chunk)
    max_num_seqs: int = 64
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    # Identity of the weights for prefix-cache keys; None: derived from the config and a sample of every
    # weight tensor (model_fingerprint). A caller that knows the file (a digest of it) may pass that.
    model_fingerprint: str | None = None
    # Disk tier of the prefix cache (engine/disk_cache.py): full blocks are written to this directory and
    # read back by later requests, also after a restart. None: RAM only. The directory is capped at
    # prefix_cache_disk_bytes, least recently used files deleted first.
    prefix_cache_dir: str | None = None
    prefix_cache_disk_bytes: int = 16 << 30
    # AsyncEngine: requests waiting for their first output beyond this are refused with Overloaded (None:
    # unbounded); a consumer that leaves more than max_buffered_deltas deltas unread is aborted.
    max_queue: int | None = None
    max_buffered_deltas: int = 4096
    # Speculative decoding (engine/speculative.py): tokens the model's MTP module drafts per step, verified in
    # the same forward. 0: off.
    speculative_tokens: int = 0
    # The paged cache's storage: "auto" (the compute dtype), "float16" / "bfloat16" (half an fp32 cache's bytes,
    # widened per tile by attention: llama.cpp's default f16 cache; not DeepSeek-V4 or V3.2) or "fp8" (MLA: the
    # latent and roped key, GQA: each head's K and V, as float8_e4m3fn with one fp32 scale per 64 values of a
    # token, dequantized per tile by attention; not DeepSeek-V4).
    kv_cache_dtype: str = "auto"
    # LoRA adapters served on the model, {name: PEFT folder} or [(name, folder)] (models/lora_serving.py); a
    # request picks one with SamplingParams.lora_name. A name given twice is an error.
    lora: dict[str, str] | list[tuple[str, str]] | None = None


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


log = logging.getLogger("selfseek.engine")


def _cache_dtype(name: str, model: CausalLM) -> torch.dtype | None:
    """EngineArgs.kv_cache_dtype -> the pools' dtype (None: the model's compute dtype)."""
    if name == "auto":
        return None
    if name == "fp8":
        if model.config.model_type == "deepseek_v4":
            raise ValueError("kv_cache_dtype fp8: not for DeepSeek-V4 (its compressed pools have no fp8 layout)")
        return torch.float8_e4m3fn
    if name in ("float16", "bfloat16"):
        if model.config.model_type == "deepseek_v4" or model.config.has_indexer:
            raise ValueError(f"kv_cache_dtype {name}: not for DeepSeek-V4 or V3.2 (their pools keep the compute "
                             "dtype)")
        dtype = getattr(torch, name)
        return None if dtype == model.dtype else dtype
    raise ValueError(f"kv_cache_dtype must be 'auto', 'float16', 'bfloat16' or 'fp8', got {name!r}")


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of a model's weights: its config, and per tensor its name, shape, dtype and 64
    values sampled evenly across it (different weights under the same config give a different value); and whether
    activations are rounded to int8 (kernels.INT8_ACTIVATIONS): its KV differs from the float path's, so a disk
    prefix cache written by one must not serve the other."""
    h = hashlib.sha256(f"int8_activations={kernels.INT8_ACTIVATIONS}".encode())
    cfg = getattr(model, "config", None)
    h.update(json.dumps(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else repr(cfg), sort_keys=True,
                        default=repr).encode())
    with torch.no_grad():
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            flat = t.detach().reshape(-1)
            if flat.numel():
                sample = flat[:: max(1, flat.numel() // 64)][:64]
                h.update(sample.to("cpu", torch.float64 if sample.is_floating_point() else torch.int64)
                         .numpy().tobytes())
    return h.hexdigest()


def kv_pool_blocks(args: EngineArgs, kv_bytes_per_token: int, max_model_len: int, free_bytes: int | None,
                   reserved_bytes: int = 0) -> int:
    """Blocks of the paged KV pool (allocated, and touched, up front).

    `args.kv_cache_memory` set: that many bytes, capped at what max_num_seqs x max_model_len can use.
    Unset: what requests need, not what memory allows: one full-length context or two blocks per running
    sequence, whichever is more (llama-server's default is one context shared by its slots), within
    min(kv_cache_fraction x free_bytes, kv_cache_max_default). Sizing from free memory alone took 2 GiB
    for the 135M default model (peak RSS 2.5 GiB). Pass kv_cache_memory for more concurrent long contexts.
    `reserved_bytes` (DeepSeek-V4's window pool) comes out of either budget first.
    """
    block_bytes = kv_bytes_per_token * args.block_size
    useful = -(-args.max_num_seqs * max_model_len // args.block_size)  # more blocks can never be used
    budget = max(0, kv_budget(args, free_bytes) - reserved_bytes) // block_bytes
    if args.kv_cache_memory:
        return min(budget, useful)
    needed = max(-(-max_model_len // args.block_size), 2 * args.max_num_seqs)
    return min(budget, needed, useful)


def kv_budget(args: EngineArgs, free_bytes: int | None) -> int:
    """Bytes the KV cache may take: kv_cache_memory, else min(kv_cache_fraction x free_bytes, kv_cache_max_default)."""
    return args.kv_cache_memory or min(int((free_bytes or 0) * args.kv_cache_fraction), args.kv_cache_max_default)


def _window_pool(model: CausalLM, args: EngineArgs, cache_dtype: torch.dtype | None, kv_bytes_per_token: int,
                 free_bytes: int | None) -> tuple[int, int]:
    """DeepSeek-V4's window pool: (blocks, bytes). What max_num_seqs running sequences hold at once, within the
    memory budget: at most budget / (block bytes + window block bytes) blocks, so there are always at least as
    many blocks as window blocks, and the blocks get the rest."""
    size = torch.empty((), dtype=cache_dtype or model.dtype).element_size()
    window_block_bytes = args.block_size * model.window_values_per_token() * size
    budget = kv_budget(args, free_bytes)
    needed = window_blocks_needed(model.lookback, args.max_num_seqs, args.max_num_batched_tokens, args.block_size,
                                  args.speculative_tokens)
    blocks = min(needed, budget // (window_block_bytes + kv_bytes_per_token * args.block_size))
    one = window_blocks_needed(model.lookback, 1, args.block_size, args.block_size, args.speculative_tokens)
    if blocks < one:
        raise ValueError(f"kv_cache_memory ({budget} bytes) is too small for DeepSeek-V4: one sequence's window "
                         f"needs {one} window blocks of {window_block_bytes} bytes besides its blocks")
    return blocks, blocks * window_block_bytes


class LLMEngine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer | None, args: EngineArgs | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        self.args = args = args or EngineArgs()
        self.max_model_len = min(args.max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        cache_dtype = _cache_dtype(args.kv_cache_dtype, model)
        self.kv_bytes_per_token = kv_bytes_per_token(model, cache_dtype)
        device = model.device
        free = None if args.kv_cache_memory else available_memory(device)
        dp = getattr(model, "data_parallel", None)  # a cache, a queue and a batch per rank (distributed/data_parallel)
        windowed = dp is None and hasattr(model, "use_window_blocks")
        window_blocks = window_bytes = 0
        if windowed:  # DeepSeek-V4: its window pool comes out of the same memory budget as the blocks
            window_blocks, window_bytes = _window_pool(model, args, cache_dtype, self.kv_bytes_per_token, free)
        num_blocks = kv_pool_blocks(args, self.kv_bytes_per_token, self.max_model_len, free, window_bytes)
        self.fingerprint = args.model_fingerprint or model_fingerprint(model)
        self.blocks = (BlockManager(int(num_blocks), args.block_size, args.enable_prefix_caching, self.fingerprint)
                       if dp is None else dp.new_blocks(args, int(num_blocks), self.fingerprint))
        if windowed:  # DeepSeek-V4: per-token rows only for each sequence's last blocks
            if args.prefix_cache_dir:
                raise ValueError("prefix_cache_dir: not for DeepSeek-V4 (its window storage has no disk layout)")
            model.use_window_blocks(self.blocks.enable_windows(model.lookback, args.max_num_seqs,
                                                               args.max_num_batched_tokens, args.speculative_tokens,
                                                               max_blocks=window_blocks))
        self.scheduler = (Scheduler(self.blocks, args.max_num_batched_tokens, args.max_num_seqs) if dp is None
                          else dp.new_scheduler(self.blocks, args))
        interleave_q8_weights(model)  # after the fingerprint: the same weights in another order
        try:
            if dp is not None:
                self.runner = dp.new_runner(model, self.blocks, cache_dtype)
            else:
                self.runner = (SpeculativeRunner(model, self.blocks, args.speculative_tokens, self.max_model_len,
                                                 cache_dtype)
                               if args.speculative_tokens else ModelRunner(model, self.blocks, cache_dtype))
        finally:
            if windowed:  # the runner has made its pools (or failed to): pools made later are not this engine's
                model.use_window_blocks(None)
        self.speculative = self.runner if isinstance(self.runner, SpeculativeRunner) else None
        if args.prefix_cache_dir and args.enable_prefix_caching:
            spec = self.speculative  # its MTP pool is spilled too, written once propose() has filled it
            self.blocks.disk = open_disk_cache(model, args.prefix_cache_dir, args.prefix_cache_disk_bytes,
                                               self.fingerprint, args.block_size,
                                               self.runner.pools + ([spec.mtp_pool] if spec else []),
                                               defer_writes=spec is not None)
        self.loras = LoRARegistry(model)
        for name, path in args.lora.items() if isinstance(args.lora, dict) else args.lora or []:
            self.loras.add(name, path)
        self.requests: dict[str, list[Sequence]] = {}
        self._arrivals = itertools.count()
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "requests_finished": 0, "requests_failed": 0}
        self.timings = {"schedule": 0.0, "forward": 0.0, "sample": 0.0, "output": 0.0, "steps": 0}  # seconds

    # ---- requests ------------------------------------------------------------------------------------
    def prepare(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Tokenize and validate against this model; RequestError (a ValueError) naming the field at fault."""
        vocab = self.config.vocab_size
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer; send token ids", param="prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError) as e:
                raise RequestError(f"prompt must be a string or token ids: {e}", param="prompt") from None
        if not ids:
            raise RequestError("prompt is empty", param="prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt has token ids outside the vocabulary [0, {vocab})", param="prompt")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"prompt has {len(ids)} tokens; the context is {self.max_model_len} tokens",
                               param="prompt", code="context_length_exceeded")
        if self.blocks.blocks_needed(len(ids) + 1) > self.blocks.num_blocks:
            raise RequestError(f"prompt has {len(ids)} tokens; the KV cache holds "
                               f"{self.blocks.num_blocks * self.blocks.block_size}", param="prompt",
                               code="context_length_exceeded")
        self.check_params(params)
        return ids

    def check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: token ids against this model's vocabulary."""
        vocab = self.config.vocab_size
        for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise RequestError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab})", param=name)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request's n completions; nothing is queued if building any of them raises."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already running", param="request_id")
        lora = None
        if params.lora_name is not None:
            try:
                lora = self.loras.get(params.lora_name)
            except KeyError as e:
                raise RequestError(e.args[0], param="lora_name") from None
        root = self.blocks.root_for(params.cache_salt, lora.cache_key if lora else None)
        seqs: list[Sequence] = []
        for i in range(params.n):
            seq = Sequence(request_id, i, list(prompt_ids), params, next(self._arrivals),
                           leader=seqs[0] if seqs and self.blocks.prefix_caching else None,
                           stop_ids=frozenset(self._stop_ids(params)), cache_root=root,
                           lora_index=lora.index if lora else 0,
                           processors=[f() for f in params.logits_processor_factories] + list(params.logits_processors))
            if params.seed is not None:
                seq.generator = torch.Generator().manual_seed(params.generator_seed(i))
            seqs.append(seq)
        for seq in seqs:
            self.scheduler.add(seq)
        self.requests[request_id] = seqs
        self.counters["prompt_tokens"] += len(prompt_ids)

    def abort(self, request_id: str, error: EngineError | None = None) -> list[RequestDelta]:
        """Stop a request at once and free its blocks; `error` goes on its final deltas."""
        deltas = []
        for seq in self.requests.pop(request_id, []):
            if not seq.finished:
                self.scheduler.finish(seq)
                seq.finish_reason, seq.error = "abort", error
                deltas.append(self._delta(seq, final=True))
        return deltas

    def stop_sequence(self, request_id: str, index: int) -> None:
        """Finish one completion the output processor ended (a stop string); its final delta went out there."""
        seqs = self.requests.get(request_id, [])
        if index < len(seqs) and not seqs[index].finished:
            self.scheduler.finish(seqs[index])
            seqs[index].finish_reason = "stop"
            self.counters["requests_finished"] += 1
        if all(q.finished for q in seqs):
            self.requests.pop(request_id, None)

    def fail_request(self, request_id: str, cause: BaseException) -> list[RequestDelta]:
        """Fail one request alone: RequestFailed (its cause chained, and logged) on each of its final deltas."""
        if isinstance(cause, EngineError):
            error = cause
        else:
            log.error("request %s failed in the engine", request_id, exc_info=cause)
            error = RequestFailed(f"request {request_id} failed in the engine: {type(cause).__name__}")
            error.__cause__ = cause
        self.counters["requests_failed"] += request_id in self.requests
        return self.abort(request_id, error)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step ------------------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        t0 = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return self._fail_unschedulable()
        if self.speculative is not None:
            self.speculative.schedule_drafts(scheduled)
        t1 = time.perf_counter()
        logits, sampled, failed = self._forward(scheduled)
        deltas: list[RequestDelta] = []
        for seq, cause in failed:
            deltas += self.fail_request(seq.request_id, cause)
        for s in scheduled:
            if not s.seq.finished:
                s.seq.num_computed += s.num_new
                self.blocks.commit_full_blocks(s.seq)  # before a finishing sequence frees them: they stay cached
        t2 = time.perf_counter()
        live = [i for i, s in enumerate(sampled) if not s.seq.finished]
        if len(live) < len(sampled):
            logits, sampled = logits[live], [sampled[i] for i in live]
        tokens, logprobs, failures = sample(logits, [s.seq for s in sampled]) if sampled else ([], [], {})
        t3 = time.perf_counter()
        for j, (s, token, lp) in enumerate(zip(sampled, tokens, logprobs, strict=True)):
            seq = s.seq
            if seq.finished:  # aborted mid-step, or a sibling failed
                continue
            if j in failures:
                deltas += self.fail_request(seq.request_id, failures[j])
                continue
            try:
                if self.speculative is not None:  # appends `token` and what the drafts add
                    self.speculative.accept(seq, token, lp, logits[j], self._append)
                else:
                    self._append(seq, token, lp)
                delta = self._delta(seq, final=seq.finish_reason is not None)
            except Exception as e:  # its speculative accept: fail it alone
                deltas += self.fail_request(seq.request_id, e)
                continue
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                self.counters["requests_finished"] += 1
            deltas.append(delta)
        for request_id in {d.request_id for d in deltas if d.finish_reason is not None}:
            if all(q.finished for q in self.requests.get(request_id, [])):
                self.requests.pop(request_id, None)
        if self.speculative is not None:
            self.speculative.propose()
        t = self.timings
        t["schedule"] += t1 - t0
        t["forward"] += t2 - t1
        t["sample"] += t3 - t2
        t["output"] += time.perf_counter() - t3
        t["steps"] += 1
        return deltas

    def _forward(
        self, scheduled: list[Scheduled]
    ) -> tuple[torch.Tensor, list[Scheduled], list[tuple[Sequence, BaseException]]]:
        """runner.run on the whole batch; if it raises, on each sequence alone, so only the one whose input
        breaks the forward fails (each writes the same KV slots again, so the re-run is harmless)."""
        try:
            logits, sampled = self.runner.run(scheduled)
            return logits, sampled, []
        except Exception as e:
            if len(scheduled) == 1:
                self._probe()
                return self._no_logits(), [], [(scheduled[0].seq, e)]
            log.warning("a batched forward of %d sequences raised %s: running them one at a time",
                        len(scheduled), type(e).__name__)
        rows, sampled, failed = [], [], []
        for s in scheduled:
            try:
                logits, one = self.runner.run([s])
            except Exception as e:
                failed.append((s.seq, e))
                continue
            rows.append(logits)
            sampled += one
        if len(failed) == len(scheduled):
            self._probe()
        return (torch.cat(rows) if rows else self._no_logits()), sampled, failed

    @torch.inference_mode()
    def _probe(self) -> None:
        """Every sequence of a step failed its forward: tell a broken engine (a lost device, corrupted
        weights) from inputs that fail, by running one plain token through the model without the cache.
        EngineDead if even that raises: the caller stops serving rather than fail every request forever."""
        try:
            self.model(torch.zeros(1, 1, dtype=torch.long, device=self.model.device))
        except Exception as e:
            raise EngineDead(f"the model cannot run a forward pass any more: {type(e).__name__}") from e

    def _no_logits(self) -> torch.Tensor:
        return torch.empty(0, self.config.vocab_size)

    def _fail_unschedulable(self) -> list[RequestDelta]:
        # Nothing fits even with every block free (prepare() should have caught it): fail the head request.
        seq = self.scheduler.waiting[0]
        return self.abort(seq.request_id, Overloaded("the request does not fit in the KV cache"))

    def fail_all(self, error: EngineError | str) -> list[RequestDelta]:
        """Fail every request (after an error the engine cannot attribute to one of them)."""
        deltas = []
        for request_id in list(self.requests):
            err = RequestFailed(error) if isinstance(error, str) else error
            deltas += self.abort(request_id, err)
        return deltas

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            if self.tokenizer is not None:
                ids |= self.tokenizer.stop_ids
            eos = self.config.eos_token_id
            ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return ids

    def _append(self, seq: Sequence, token: int, logprobs: dict[int, float] | None) -> None:
        p = seq.params
        seq.output_ids.append(token)
        seq.pending_ids.append(token)
        if logprobs is not None:
            seq.pending_logprobs.append(logprobs)
        self.counters["generation_tokens"] += 1
        if token in seq.stop_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"

    def _delta(self, seq: Sequence, final: bool) -> RequestDelta:
        delta = RequestDelta(
            request_id=seq.request_id, index=seq.index, token_ids=seq.pending_ids, text="",
            logprobs=seq.pending_logprobs if seq.params.logprobs is not None else None,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            num_prompt_tokens=len(seq.prompt_ids), num_cached_tokens=seq.num_cached_prompt,
            error=seq.error if final else None,
        )
        seq.pending_ids, seq.pending_logprobs = [], []
        return delta

    # ---- introspection -------------------------------------------------------------------------------
    def stats(self) -> dict:
        b = self.blocks
        in_use = sum(1 for r in b.ref_count if r > 0)
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_total": b.num_blocks,
            "kv_blocks_used": in_use,
            "kv_blocks_free": b.num_free,
            "block_size": b.block_size,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "prefix_cache_hit_tokens": b.hits,
            "prefix_cache_query_tokens": b.queries,
            "prefix_cache_disk_hit_tokens": b.disk_hits,  # part of prefix_cache_hit_tokens, read from disk
            **(b.disk.counters if b.disk is not None else {}),
            **(b.window_counters if getattr(b, "window_of", None) is not None else {}),  # DeepSeek-V4
            "preemptions": self.scheduler.num_preemptions,
            **self.counters,
            **(self.speculative.stats() if self.speculative is not None else {}),
        }
