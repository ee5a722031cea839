"""Decode tokens/s of a small random DeepSeek-V4-shaped model against a V3-shaped one of about the same size, through
the engine (one sequence, greedy), fp32 on the CPU.

    .venv/bin/python benchmarks/v4_decode.py [--prompt 512] [--new 64] [--threads N] [--rounds 3]

The two models are timed in alternation (`--rounds` times each) and the median printed with every round's figure:
on a shared machine a single run of one model after the other mostly measures the load.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from selfseek import LLM, SamplingParams

V4 = dict(vocab_size=4096, hidden_size=512, moe_intermediate_size=256, num_hidden_layers=8, num_attention_heads=8,
          head_dim=128, q_lora_rank=256, num_experts_per_tok=2, n_routed_experts=8, sliding_window=128,
          layer_types=["sliding_attention"] * 2 + ["compressed_sparse_attention", "heavily_compressed_attention"] * 3,
          mlp_layer_types=["hash_moe"] + ["moe"] * 7, o_groups=2, o_lora_rank=128, index_n_heads=8,
          index_head_dim=64, index_topk=64, hc_mult=4, partial_rotary_factor=0.25, max_position_embeddings=8192)
V3 = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=8,
          num_attention_heads=8, kv_lora_rank=128, q_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
          v_head_dim=64, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
          max_position_embeddings=8192)


def _save(kind: str, folder: Path) -> Path:
    import transformers

    cls, cfg_cls, kw = {"v4": ("DeepseekV4ForCausalLM", "DeepseekV4Config", V4),
                        "v3": ("DeepseekV3ForCausalLM", "DeepseekV3Config", V3)}[kind]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**kw)).eval()
    out = folder / kind
    model.save_pretrained(out)
    return out


def decode_tps(llm: LLM, prompt: int, new: int) -> float:
    ids = torch.randint(2, 4096, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    t0 = time.perf_counter()
    llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    t1 = time.perf_counter()
    llm.generate([ids], SamplingParams(temperature=0, max_tokens=new + 1, ignore_eos=True))
    t2 = time.perf_counter()
    return new / ((t2 - t1) - (t1 - t0))  # minus the prefill (the prefix cache serves most of it both times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        llms = {kind: LLM(_save(kind, Path(tmp)), dtype="float32", device="cpu", progress=False)
                for kind in ("v3", "v4")}
        for llm in llms.values():  # warm up (and fill the prefix cache)
            decode_tps(llm, args.prompt, 2)
        rates: dict[str, list[float]] = {kind: [] for kind in llms}
        for _ in range(args.rounds):
            for kind, llm in llms.items():
                rates[kind].append(decode_tps(llm, args.prompt, args.new))
        for kind, llm in llms.items():
            params = sum(t.numel() for t in llm.model.parameters())
            r = sorted(rates[kind])
            print(f"{kind}: {params / 1e6:.1f}M parameters, decode {r[len(r) // 2]:.1f} tok/s (median; rounds "
                  f"{' '.join(f'{x:.1f}' for x in rates[kind])}) after a {args.prompt}-token prompt")


if __name__ == "__main__":
    main()
