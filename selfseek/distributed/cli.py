"""The parallel-run flags of `selfseek serve` (read back by launch.parallel_options)."""

from __future__ import annotations

import argparse


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallel (torch.distributed: gloo on CPUs, NCCL on GPUs)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks splitting attention heads, MLPs and "
                   "the vocabulary")
    g.add_argument("--expert-parallel-size", type=int, default=1, help="ranks splitting the routed experts "
                   "(all-to-all dispatch and combine)")
    g.add_argument("--data-parallel-size", type=int, default=1, help="data-parallel attention: ranks each serving "
                   "their own sequences from their own KV cache, MoE layers shared through expert parallelism "
                   "(with --expert-parallel-size equal to it); --kv-cache-memory is each rank's")
    g.add_argument("--nnodes", type=int, default=1, help="machines in the run (each runs this same command)")
    g.add_argument("--node-rank", type=int, default=0, help="this machine's index; node 0 serves HTTP")
    g.add_argument("--master-addr", default=None, help="node 0's address every node can reach (default 127.0.0.1)")
    g.add_argument("--master-port", type=int, default=None, help="a free port on node 0 for the rendezvous")
    g.add_argument("--distributed-timeout", type=float, default=None,
                   help="seconds a collective may take before the run is declared broken (default 60)")
