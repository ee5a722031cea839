"""Data-parallel training on torch.distributed: two spawned gloo processes on loopback, with DistributedDataParallel
and ZeRO-1 (sharded AdamW state), with FSDP2 (fully_shard: sharded parameters, gradients and AdamW state) or with
expert parallelism (each rank holds half the routed experts; tokens reach them through all-to-all), each stopped
after 2 steps and resumed from its checkpoint, end with the losses and weights of one uninterrupted process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selfseek.train.build import model_config_dict, new_model, parse_model_config
from selfseek.train.config import LoopConfig, OptimConfig
from selfseek.train.dist import DistContext
from selfseek.train.trainer import Trainer

TINY = {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 64}
STEPS = 4


def _export(model, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path / "weights.pt")


def _trainer(ctx: DistContext, out: Path, micro: int = 2, **loop) -> Trainer:
    torch.manual_seed(0)
    seqs = torch.randint(3, 128, (37, 17), generator=torch.Generator().manual_seed(1))
    data = [(x[:-1], x[1:]) for x in seqs]
    d = model_config_dict(TINY, 128, 0, 1)
    model = new_model(parse_model_config(d), 0.02, seed=0)
    cfg = LoopConfig(steps=STEPS, batch_size=8, micro_batch_size=micro, eval_every=2, eval_batches=3, log_every=1,
                     checkpoint_every=0, progress=False, bias_update_speed=0.01, **loop)
    # eps=1e-3: AdamW's default 1e-8 magnifies fp32 re-association noise in near-zero gradients past the
    # weight tolerance below (see test_train's torchrun test); a smooth update compares the gradients
    return Trainer(model=model, loop=cfg, optim=OptimConfig(lr=3e-3, warmup_steps=1, eps=1e-3), train_data=data[:32],
                   valid_data=data[32:], pad_id=0, seed=0, out_dir=out, ctx=ctx, job_config={}, export=_export)


MODES = (("shard_optimizer", 4), ("fsdp", 2), ("expert_parallel", 2))  # (mode, micro-batch size)


def _share(t: Trainer, mode: str) -> tuple[int, int]:
    """(what this rank holds, the whole): ZeRO's AdamW state tensors, FSDP2's AdamW state elements, the experts."""
    if mode == "shard_optimizer":
        return len(t.optimizer.optim.state), len(t.params)
    if mode == "fsdp":
        return sum(s["exp_avg"].to_local().numel() for s in t.optimizer.state.values()), \
            sum(p.numel() for p in t.model.parameters() if p.requires_grad)
    experts = t.model.model.layers[1].mlp.experts
    return experts.n_experts, TINY["n_routed_experts"]


def _worker(rank: int, world: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ctx = DistContext(rank=rank, world=world, local_rank=rank)
    try:
        for mode, micro in MODES:
            first = _trainer(ctx, out / mode, micro, stop_after=2, **{mode: True})
            first.run()
            local, whole = _share(first, mode)
            second = _trainer(ctx, out / mode, micro, resume="auto", **{mode: True})
            second.run()
            if rank == 0:
                torch.save({"history": first.history + second.history, "local": local, "whole": whole},
                           out / mode / "result.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_zero_fsdp2_and_expert_parallel_resumed_equal_one_process(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = _trainer(DistContext(), tmp_path / "one")
        one.run()
    finally:
        torch.set_num_threads(n)
    mp.spawn(_worker, args=(2, _free_port(), tmp_path / "two"), nprocs=2, join=True)
    ref = torch.load(tmp_path / "one" / "final" / "weights.pt")
    for mode, _ in MODES:
        two = torch.load(tmp_path / "two" / mode / "result.pt", weights_only=False)
        assert 0 < two["local"] < two["whole"], mode  # each rank keeps only its share of the AdamW state
        assert [r["step"] for r in two["history"]] == list(range(1, STEPS + 1))
        for a, b in zip(one.history, two["history"], strict=True):
            for key in ("loss", "mtp_loss", "balance_loss", "val_loss"):
                if key in a:
                    assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]) + 1e-7, (mode, a["step"], key, a[key], b[key])
        weights = torch.load(tmp_path / "two" / mode / "final" / "weights.pt")
        assert set(weights) == set(ref)
        for k, w in ref.items():
            torch.testing.assert_close(weights[k], w, rtol=1e-4, atol=1e-6, msg=f"{mode} {k}")
