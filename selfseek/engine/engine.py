"""LLMEngine: the step loop. Requests in; each step schedules, runs the model once, samples, and turns new
tokens into deltas (text with stop strings handled, logprobs, finish reasons).

Not thread-safe by itself: the server drives it through engine/async_engine.py, LLM.generate directly.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass

import torch

from selfseek.engine.async_engine import RequestDelta
from selfseek.engine.kv_cache import BlockManager
from selfseek.engine.runner import ModelRunner, kv_bytes_per_token
from selfseek.engine.sampler import sample
from selfseek.engine.scheduler import Scheduler
from selfseek.engine.sequence import Sequence
from selfseek.models.model import CausalLM
from selfseek.sampling_params import SamplingParams
from selfseek.tokenizer import IncrementalDetokenizer, Tokenizer


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


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class LLMEngine:
    def __init__(self, model: CausalLM, tokenizer: Tokenizer | None, args: EngineArgs | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        self.args = args = args or EngineArgs()
        self.max_model_len = min(args.max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        self.kv_bytes_per_token = kv_bytes_per_token(model)
        device = model.device
        budget = args.kv_cache_memory or min(int(available_memory(device) * args.kv_cache_fraction),
                                             args.kv_cache_max_default)
        useful = args.max_num_seqs * self.max_model_len  # more slots than this can never be used
        num_blocks = min(budget // (self.kv_bytes_per_token * args.block_size), -(-useful // args.block_size))
        self.blocks = BlockManager(int(num_blocks), args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, args.max_num_batched_tokens, args.max_num_seqs)
        self.runner = ModelRunner(model, self.blocks)
        self.requests: dict[str, list[Sequence]] = {}
        self._arrivals = itertools.count()
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "requests_finished": 0}
        self.timings = {"schedule": 0.0, "forward": 0.0, "sample": 0.0, "output": 0.0, "steps": 0}  # seconds

    # ---- requests ------------------------------------------------------------------------------------
    def prepare(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Tokenize and validate; ValueError with the reason for a prompt we cannot serve."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; send token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt is empty")
        if any(not 0 <= t < self.config.vocab_size for t in ids):
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {self.config.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the context is {self.max_model_len} tokens")
        if self.blocks.blocks_needed(len(ids) + 1) > self.blocks.num_blocks:
            raise ValueError(f"prompt has {len(ids)} tokens; the KV cache holds "
                             f"{self.blocks.num_blocks * self.blocks.block_size}")
        return ids

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        seqs: list[Sequence] = []
        for i in range(params.n):
            seq = Sequence(request_id, i, list(prompt_ids), params, next(self._arrivals),
                           leader=seqs[0] if seqs and self.blocks.prefix_caching else None,
                           stop_ids=frozenset(self._stop_ids(params)))
            if params.seed is not None:
                seq.generator = torch.Generator().manual_seed(params.seed + i)
            if self.tokenizer is not None:
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = seqs
        self.counters["prompt_tokens"] += len(prompt_ids)

    def abort(self, request_id: str) -> list[RequestDelta]:
        """Stop a request at once and free its blocks."""
        deltas = []
        for seq in self.requests.pop(request_id, []):
            if not seq.finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
                deltas.append(self._delta(seq, final=True))
        return deltas

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step ------------------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        t0 = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return self._fail_unschedulable()
        t1 = time.perf_counter()
        logits, sampled = self.runner.run(scheduled)
        for s in scheduled:
            s.seq.num_computed += s.num_new
            self.blocks.commit_full_blocks(s.seq)  # before a finishing sequence frees them: they stay cached
        t2 = time.perf_counter()
        tokens, logprobs = sample(logits, [s.seq for s in sampled]) if sampled else ([], [])
        t3 = time.perf_counter()
        deltas = []
        for s, token, lp in zip(sampled, tokens, logprobs, strict=True):
            seq = s.seq
            if seq.finished:  # aborted mid-step
                continue
            self._append(seq, token, lp)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                self.counters["requests_finished"] += 1
            deltas.append(self._delta(seq, final=seq.finish_reason is not None))
        for request_id in {d.request_id for d in deltas if d.finish_reason is not None}:
            if all(q.finished for q in self.requests.get(request_id, [])):
                self.requests.pop(request_id, None)
        t = self.timings
        t["schedule"] += t1 - t0
        t["forward"] += t2 - t1
        t["sample"] += t3 - t2
        t["output"] += time.perf_counter() - t3
        t["steps"] += 1
        return deltas

    def _fail_unschedulable(self) -> list[RequestDelta]:
        # Nothing fits even with every block free (prepare() should have caught it): fail the head request.
        seq = self.scheduler.waiting[0]
        deltas = self.abort(seq.request_id)
        for d in deltas:
            d.finish_reason, d.error = "abort", "the request does not fit in the KV cache"
        return deltas

    def fail_all(self, message: str) -> list[RequestDelta]:
        deltas = []
        for request_id in list(self.requests):
            for d in self.abort(request_id):
                d.error = message
                deltas.append(d)
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
        elif seq.detokenizer is not None:
            seq.text += seq.detokenizer.add(token)
            for stop in p.stop:
                cut = seq.text.find(stop, max(0, seq.emitted - len(stop)))
                if cut != -1:
                    seq.text, seq.finish_reason, seq.stop_reason = seq.text[:cut], "stop", stop
                    break
        if seq.finish_reason is None and (len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            seq.finish_reason = "length"
        if seq.finish_reason is not None and seq.detokenizer is not None and not isinstance(seq.stop_reason, str):
            seq.text += seq.detokenizer.flush()

    def _delta(self, seq: Sequence, final: bool) -> RequestDelta:
        holdback = 0 if final else max((len(s) for s in seq.params.stop), default=1) - 1
        end = max(seq.emitted, len(seq.text) - holdback)
        delta = RequestDelta(
            request_id=seq.request_id, index=seq.index, token_ids=seq.pending_ids,
            text=seq.text[seq.emitted:end],
            logprobs=seq.pending_logprobs if seq.params.logprobs is not None else None,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            num_prompt_tokens=len(seq.prompt_ids), num_cached_tokens=seq.num_cached_prompt,
        )
        seq.emitted, seq.pending_ids, seq.pending_logprobs = end, [], []
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
            "preemptions": self.scheduler.num_preemptions,
            **self.counters,
        }
