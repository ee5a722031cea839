"""Serving across processes and machines on torch.distributed: launch (spawn / torchrun / multi-node, lockstep),
parallel (tensor-parallel module surgery and sharded loading), expert_parallel (all-to-all MoE), comm (timed,
byte-counted collectives), plan (bytes and memory per rank on paper)."""
