"""Prometheus metrics: the engine's state (from AsyncEngine.stats() at scrape time), request latencies
measured by the server, and per-expert routing counts of MoE models.

Names follow vLLM's (`vllm:num_requests_running` -> `selfseek:num_requests_running`, ...) so dashboards
port by changing the prefix. Each app has its own registry, so several servers can live in one process.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

P = "selfseek:"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


class ExpertCounter:
    """Counts how often each routed expert is chosen, per MoE layer, with forward hooks on the gates.

    The hooks only read the gate's output (its expert ids) and add a bincount into a tensor on the
    model's device, so the model's math is untouched and no device sync happens per step; the counts
    are read at scrape time."""

    def __init__(self, model: torch.nn.Module):
        from selfseek.models.moe import Gate

        self.counts: dict[str, torch.Tensor] = {}
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, Gate):
                layer = re.search(r"layers\.(\d+)", name)
                key = layer.group(1) if layer else name
                self.counts[key] = torch.zeros(module.n_experts, dtype=torch.long, device=module.weight.device)
                self._handles.append(module.register_forward_hook(self._hook(key)))

    def _hook(self, key: str) -> Callable:
        def count(module, inputs, output) -> None:
            ids = output[1]
            self.counts[key] += torch.bincount(ids.flatten(), minlength=self.counts[key].numel())
        return count

    def snapshot(self) -> dict[str, list[int]]:
        return {k: v.tolist() for k, v in self.counts.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class _EngineCollector:
    """Reads the engine's stats at each scrape."""

    def __init__(self, stats: Callable[[], dict], model_name: str, experts: ExpertCounter | None):
        self.stats, self.model_name, self.experts = stats, model_name, experts

    def collect(self):
        s, label = self.stats(), [self.model_name]

        def gauge(name: str, doc: str, value: float):
            g = GaugeMetricFamily(P + name, doc, labels=["model_name"])
            g.add_metric(label, value)
            return g

        def counter(name: str, doc: str, value: float):
            c = CounterMetricFamily(P + name, doc, labels=["model_name"])
            c.add_metric(label, value)
            return c

        total = max(s.get("kv_blocks_total", 0), 1)
        queries = s.get("prefix_cache_query_tokens", 0)
        yield gauge("num_requests_running", "Sequences in the running batch.", s.get("running", 0))
        yield gauge("num_requests_waiting", "Sequences waiting to be scheduled.", s.get("waiting", 0))
        yield gauge("kv_cache_blocks_used", "KV cache blocks in use.", s.get("kv_blocks_used", 0))
        yield gauge("kv_cache_blocks_total", "KV cache blocks in the pool.", s.get("kv_blocks_total", 0))
        # at rest, used 0 and free == total (cached prefix blocks count as free: they are evicted on demand)
        yield gauge("kv_cache_blocks_free", "KV cache blocks the engine can allocate now.",
                    s.get("kv_blocks_free", s.get("kv_blocks_total", 0) - s.get("kv_blocks_used", 0)))
        yield gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use.", s.get("kv_blocks_used", 0) / total)
        yield gauge("prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / tokens looked up.",
                    s.get("prefix_cache_hit_tokens", 0) / queries if queries else 0.0)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", queries)
        yield counter("prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                      s.get("prefix_cache_hit_tokens", 0))
        if "disk_writes" in s:  # the prefix cache's disk tier (engine/disk_cache.py)
            yield counter("prefix_cache_disk_hits", "Prompt tokens read back from the prefix cache's disk tier "
                          "(also counted in prefix_cache_hits).", s.get("prefix_cache_disk_hit_tokens", 0))
            yield counter("prefix_cache_disk_writes", "Cache blocks written to the disk tier.", s["disk_writes"])
            yield counter("prefix_cache_disk_rejected", "Disk-tier files that failed verification (deleted).",
                          s.get("disk_rejected", 0))
        yield counter("prompt_tokens", "Prompt tokens submitted.", s.get("prompt_tokens", 0))
        yield counter("generation_tokens", "Tokens generated.", s.get("generation_tokens", 0))
        yield counter("num_preemptions", "Sequences preempted to free KV cache blocks.", s.get("preemptions", 0))
        if "spec_draft_tokens" in s:  # speculative decoding (engine/speculative.py), vLLM's metric names
            yield counter("spec_decode_num_drafts", "Sequence-steps that verified drafts.", s["spec_verify_steps"])
            yield counter("spec_decode_num_draft_tokens", "Draft tokens verified.", s["spec_draft_tokens"])
            yield counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.", s["spec_accepted_tokens"])
            c = CounterMetricFamily(P + "spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted, per "
                                    "draft position.", labels=["model_name", "position"])
            for pos, n in enumerate(s["spec_accepted_per_position"]):
                c.add_metric([self.model_name, str(pos)], n)
            yield c
        if self.experts is not None and self.experts.counts:
            c = CounterMetricFamily(P + "moe_expert_routed_tokens", "Tokens routed to each expert, per MoE layer.",
                                    labels=["model_name", "layer", "expert"])
            for layer, counts in self.experts.snapshot().items():
                for e, n in enumerate(counts):
                    c.add_metric([self.model_name, layer, str(e)], n)
            yield c


class Metrics:
    def __init__(self, stats: Callable[[], dict], model_name: str, model: torch.nn.Module | None = None,
                 expert_counts: bool = True):
        self.registry = CollectorRegistry()
        self.experts = ExpertCounter(model) if (model is not None and expert_counts) else None
        self.registry.register(_EngineCollector(stats, model_name, self.experts))
        lab = ["model_name"]
        self.model_name = model_name
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to first token.", lab,
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between successive output tokens.", lab,
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Request latency, arrival to last token.", lab,
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.finished = Counter(P + "request_success", "Finished completions by finish reason.",
                                lab + ["finished_reason"], registry=self.registry)
        self.http_errors = Counter(P + "request_errors", "Requests answered with an error status.",
                                   lab + ["status"], registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
