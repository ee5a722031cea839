"""The parallel plan on paper (selfseek/distributed/plan.py): bytes each rank sends per decoded and per prefill token
and memory per rank, for a model config and layouts; by default DeepSeek-V3-671B on 1, 2, 4, 8 and 16 nodes of 8 GPUs.

    .venv/bin/python benchmarks/comm_plan.py                       # V3-671B, its published config
    .venv/bin/python benchmarks/comm_plan.py --config path/to/config.json --gpus-per-node 8 --context 32768

Per node count two layouts: tensor-parallel attention inside a node (T = 8) with data-parallel groups across nodes
(D = nodes) and experts over every GPU (E = world); and DeepSeek's decode layout, data-parallel attention on every
GPU (T = 1, D = E = world). Weights at 1 byte (FP8, as released), activations and KV at 2 bytes (bf16); decode
batch per DP group and the prefill chunk as given. Expected all-to-all traffic assumes uniform routing.
Measured against the collectives' own byte counters on 2 loopback ranks in tests/test_distributed.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from selfseek.config import ModelConfig
from selfseek.distributed import plan
from selfseek.distributed.parallel import Layout

# DeepSeek-V3 / R1 config.json (deepseek-ai/DeepSeek-V3), the fields the plan reads and the loader checks.
V3_671B = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6, "rope_theta": 10000, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
}


def load_config(path: str | None) -> ModelConfig:
    if path is None:
        return ModelConfig.from_dict(V3_671B)
    p = Path(path)
    return ModelConfig.from_file(p) if p.is_dir() else ModelConfig.from_dict(json.loads(p.read_text()), str(p))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="a config.json or checkpoint folder (default: V3-671B)")
    ap.add_argument("--nodes", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768, help="KV tokens per rank's sequences (all together)")
    ap.add_argument("--batch", type=int, default=64, help="decoding sequences per data-parallel group")
    ap.add_argument("--prefill-chunk", type=int, default=4096)
    ap.add_argument("--weight-bytes", type=float, default=1.0, help="1: FP8 as released; 2: bf16")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    total = plan.weight_params(cfg, Layout())
    print(f"{cfg.model_type}: {(total['dense'] + total['experts']) / 1e9:.1f}B parameters "
          f"({total['experts'] / 1e9:.1f}B in routed experts), weights {args.weight_bytes:g} B/param, "
          f"KV at {args.context} tokens, decode batch {args.batch} per DP group, prefill chunk {args.prefill_chunk}")
    print(f"{'nodes':>5} {'GPUs':>5} {'layout':<14} {'decode B/token':>15} {'prefill B/token':>16} "
          f"{'weights GiB':>12} {'KV GiB':>7} {'total GiB':>10}")
    for nodes in args.nodes:
        world = nodes * args.gpus_per_node
        layouts = [(f"T{args.gpus_per_node} D{nodes} E{world}", Layout(args.gpus_per_node, world, nodes, nodes)),
                   (f"T1 D{world} E{world}", Layout(1, world, world, nodes))]
        for name, layout in layouts:
            tok = plan.per_token(cfg, layout, args.batch, args.prefill_chunk, act_bytes=2)
            mem = plan.memory(cfg, layout, args.context, args.weight_bytes)
            print(f"{nodes:>5} {world:>5} {name:<14} {tok['decode'] / 1e6:>13.2f}MB {tok['prefill'] / 1e6:>14.2f}MB "
                  f"{mem['weights'] / plan.GIB:>12.1f} {mem['kv'] / plan.GIB:>7.2f} {mem['total'] / plan.GIB:>10.1f}")


if __name__ == "__main__":
    main()
