"""KV-cache bytes per token of V3- and V4-shaped configs at 4K / 128K / 1M tokens of context.

    .venv/bin/python benchmarks/kv_bytes.py [--bytes-per-value 1]

"reference layout" is the one DeepSeek's V4 inference keeps (models/deepseek_v4.kv_bytes_per_token: a ring of the
last sliding_window KV rows per layer plus the compressed entries and CSA's indexer keys); V3 / V3.2 keep the MLA
latent (+ the V3.2 indexer key) for every token. "selfseek now" is the pool row selfseek's engine keeps per token
for V4 today, independent of context: every layer the token's KV; CSA / HCA layers also the compressors' raw inputs
(C, Z; CSA: overlapping 2m-wide, plus the indexer's) and a share of the compressed entries packed per 16 aligned
rows (ceil(16 / m) entries of D (+ D^I) values per 16 rows, models/deepseek_v4.V4Attention.ENTRY_GROUP).
"""

from __future__ import annotations

import argparse

from selfseek.config import ModelConfig
from selfseek.models import deepseek_v4

V3 = dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
          num_hidden_layers=61, num_attention_heads=128, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128,
          qk_rope_head_dim=64, v_head_dim=128)
V32 = dict(V3, model_type="deepseek_v32", index_n_heads=64, index_head_dim=128, index_topk=2048)
V4_FLASH = dict(model_type="deepseek_v4", vocab_size=129280, hidden_size=4096, num_hidden_layers=43,
                num_attention_heads=64, moe_intermediate_size=2048, compress_ratios=[0, 0] + [4, 128] * 20 + [4, 0])
V4_PRO = dict(model_type="deepseek_v4", vocab_size=129280, hidden_size=7168, num_hidden_layers=61,
              num_attention_heads=128, moe_intermediate_size=3072)  # transformers' default layer_types (Pro's)
CONTEXTS = {"4K": 4096, "128K": 131072, "1M": 1048576}


GROUP = 16  # rows sharing their spare columns for compressed entries


def selfseek_row_values(cfg: ModelConfig, layer_types: tuple[str, ...] | None = None) -> int:
    """Values per token in selfseek's current V4 pool rows (all `layer_types`; default the model's layers)."""
    d, di, total = cfg.head_dim, cfg.index_head_dim, 0
    for lt in cfg.v4.layer_types if layer_types is None else layer_types:
        total += d
        if lt == deepseek_v4.CSA:
            entries = -(-GROUP // cfg.v4.compress_rate_csa)
            total += 4 * d + 4 * di + -(-entries * (d + di) // GROUP)
        elif lt == deepseek_v4.HCA:
            entries = -(-GROUP // cfg.v4.compress_rate_hca)
            total += 2 * d + -(-entries * d // GROUP)
    return total


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
        v = selfseek_row_values(ModelConfig.from_dict(d)) * bytes_per_value
        rows.append(f"{name:<26}" + f"{v:>12.0f}" * len(CONTEXTS) + f"{v / base:>11.1%}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bytes-per-value", type=float, default=1.0, help="1: FP8 cache, 2: bf16")
    args = ap.parse_args()
    print(f"KV-cache bytes per token (mean over the context), {args.bytes_per_value:g} byte(s) per value")
    print("\n".join(table(args.bytes_per_value)))


if __name__ == "__main__":
    main()
