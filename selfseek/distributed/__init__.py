"""Serving across processes and machines on torch.distributed: launch (spawn / torchrun / multi-node, lockstep),
parallel (tensor-parallel module surgery and sharded loading), expert_parallel (all-to-all MoE), data_parallel
(each rank its own sequences and KV cache, MoE through EP), comm (timed, byte-counted collectives), plan (bytes
and memory per rank on paper)."""
