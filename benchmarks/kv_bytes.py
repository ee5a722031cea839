"""KV-cache bytes per token of V3- and V4-shaped configs at 4K / 128K / 1M tokens of context.

    .venv/bin/python benchmarks/kv_bytes.py [--bytes-per-value 1]

"reference layout" is the one DeepSeek's V4 inference keeps (models/deepseek_v4.kv_bytes_per_token: a ring of the
last sliding_window KV rows per layer plus the compressed entries and CSA's indexer keys); V3 / V3.2 keep the MLA
latent (+ the V3.2 indexer key) for every token. "selfseek's pool now" is measured from selfseek's own allocator
(engine/kv_cache.BlockManager with window storage, blocks of 64): a sequence of that length is prefilled in
8192-token chunks (no pool allocated), then the bytes it holds are counted: its blocks' entries (compressed
entries + indexer keys, ceil(16 / m) per 16 slots, models/deepseek_v4.V4Attention) and the window blocks it still
holds (per token: KV + the compressors' raw inputs C, Z), divided by its length.
"""

from __future__ import annotations

import argparse

import torch

from selfseek.config import ModelConfig
from selfseek.engine.kv_cache import BlockManager
from selfseek.engine.sequence import Sequence
from selfseek.models import deepseek_v4
from selfseek.sampling_params import SamplingParams

V3 = dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
          num_hidden_layers=61, num_attention_heads=128, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128,
          qk_rope_head_dim=64, v_head_dim=128)
V32 = dict(V3, model_type="deepseek_v32", index_n_heads=64, index_head_dim=128, index_topk=2048)
V4_FLASH = dict(model_type="deepseek_v4", vocab_size=129280, hidden_size=4096, num_hidden_layers=43,
                num_attention_heads=64, moe_intermediate_size=2048, compress_ratios=[0, 0] + [4, 128] * 20 + [4, 0])
V4_PRO = dict(model_type="deepseek_v4", vocab_size=129280, hidden_size=7168, num_hidden_layers=61,
              num_attention_heads=128, moe_intermediate_size=3072)  # transformers' default layer_types (Pro's)
CONTEXTS = {"4K": 4096, "128K": 131072, "1M": 1048576}


def selfseek_pool_bytes(cfg: ModelConfig, context: int, bytes_per_value: float = 1.0, block_size: int = 64,
                        chunk: int = 8192) -> float:
    """Mean bytes per token a `context`-token sequence holds in selfseek's V4 pools, counted from the block manager's
    allocation (as the engine makes it: window storage for one sequence, chunked prefill)."""
    with torch.device("meta"):
        attn = [deepseek_v4.V4Attention(cfg, lt) for lt in cfg.v4.layer_types]
    pools = [a.new_pool(block_size, torch.uint8, "meta") for a in attn]  # one block, unbound: one window row a slot
    entry_bytes = sum(0 if p.entries is None else p.entries.nbytes for p in pools)
    window_bytes = sum(p.window.nbytes for p in pools)
    blocks = BlockManager(-(-context // block_size), block_size, enable_prefix_caching=False)
    blocks.enable_windows(max(a.lookback for a in attn), 1, chunk)
    seq = Sequence("bench", 0, list(range(context)), SamplingParams(max_tokens=1), arrival=0)
    while seq.num_computed < context:
        blocks.release_windows(seq)
        n = min(chunk, context - seq.num_computed)
        blocks.allocate(seq, n)
        seq.num_computed += n
    blocks.release_windows(seq)  # as the next step (the first decode) starts
    held_windows = sum(1 for b in seq.block_table if blocks.window_ref[b])
    return (len(seq.block_table) * entry_bytes + held_windows * window_bytes) * bytes_per_value / context


def table(bytes_per_value: float) -> list[str]:
    rows = [f"{'model':<26}" + "".join(f"{k:>12}" for k in CONTEXTS) + f"{'1M vs V3.2':>12}"]
    v32 = ModelConfig.from_dict(V32)
    base = deepseek_v4.kv_bytes_per_token(v32, CONTEXTS["1M"], bytes_per_value)
    for name, d in (("V3 (MLA latent)", V3), ("V3.2 (latent + indexer)", V32), ("V4-Flash reference", V4_FLASH),
                    ("V4-Pro reference", V4_PRO)):
        cfg = ModelConfig.from_dict(d)
        vals = [deepseek_v4.kv_bytes_per_token(cfg, n, bytes_per_value) for n in CONTEXTS.values()]
        rows.append(f"{name:<26}" + "".join(f"{v:>12.0f}" for v in vals) + f"{vals[-1] / base:>11.1%}")
    for name, d in (("V4-Flash selfseek now", V4_FLASH), ("V4-Pro selfseek now", V4_PRO)):
        cfg = ModelConfig.from_dict(d)
        vals = [selfseek_pool_bytes(cfg, n, bytes_per_value) for n in CONTEXTS.values()]
        rows.append(f"{name:<26}" + "".join(f"{v:>12.0f}" for v in vals) + f"{vals[-1] / base:>11.1%}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bytes-per-value", type=float, default=1.0, help="1: FP8 cache, 2: bf16")
    args = ap.parse_args()
    print(f"KV-cache bytes per token (mean over the context), {args.bytes_per_value:g} byte(s) per value")
    print("\n".join(table(args.bytes_per_value)))


if __name__ == "__main__":
    main()
