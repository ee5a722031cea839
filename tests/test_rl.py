"""Preference and RL fine-tuning: rule rewards, GRPO with rollouts through the engine, DPO.

The base is a tiny DeepSeek-V3-shaped model (hidden 64, MLA + MoE) with a byte-level BPE trained on
arithmetic text, briefly fine-tuned (SFT) on single-digit sums so that sampling finds the answer sometimes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from checkpoints import greedy_tokens  # tests/ is on sys.path (conftest.py)

from selfseek.tokenizer import Tokenizer
from selfseek.train.build import model_config_dict, new_model, parse_model_config
from selfseek.train.config import TrainConfigError, load_config
from selfseek.train.export import export_hf
from selfseek.train.lora import LoRAExperts, LoRALinear, apply_lora
from selfseek.train.plots import read_metrics
from selfseek.train.rewards import (
    accuracy_reward,
    extract_code,
    final_answer,
    format_reward,
    run_unit_tests,
    unit_test_reward,
)
from selfseek.train.tasks import Arithmetic
from selfseek.train.tokenizer_train import build_tokenizer_folder
from selfseek.weights.safetensors import load_checkpoint

TINY_MODEL = {
    "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 2, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "max_position_embeddings": 128, "num_nextn_predict_layers": 0,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A random tiny V3 with its tokenizer, written as a Hugging Face folder."""
    out = tmp_path_factory.mktemp("base")
    task = Arithmetic(max_operand=9, ops="+-*")
    texts = [f"{p.prompt}{p.answer} think answer" for p in task.problems(400, seed=0)]
    build_tokenizer_folder(texts, 300, out, model_max_length=128)
    tok = Tokenizer.from_dir(out)
    d = model_config_dict(TINY_MODEL, tok.vocab_size, tok.bos_id, tok.eos_id)
    export_hf(new_model(parse_model_config(d), 0.02, seed=0), d, out, out)
    return out


@pytest.fixture(scope="module")
def sft_base(base, tmp_path_factory) -> Path:
    """`base` after a short SFT on sums of 0..2: right sometimes when sampling, so GRPO has a signal."""
    from selfseek.train.sft import setup_sft

    out = tmp_path_factory.mktemp("sft")
    data = out / "arith.jsonl"
    Arithmetic(max_operand=2).write_jsonl(data, 400, seed=0)
    cfg = load_config("sft", None, [
        f"base={base}", f"out_dir={out}", f"data.train={data}", "threads=1", "train.progress=false",
        "train.eval_every=0", "data.valid_fraction=0", "train.steps=30", "train.batch_size=32",
        "train.micro_batch_size=32", "optim.lr=3e-3", "optim.warmup_steps=5",
    ])
    setup_sft(cfg).run()
    return out / "final"


# ---- rewards ------------------------------------------------------------------------------------------


def test_accuracy_and_format_rewards():
    assert accuracy_reward(" 7\n", "7") == 1.0 and accuracy_reward("17", "7") == 0.0
    assert accuracy_reward("<think>3+4 is 7, not 8</think> 7", "7") == 1.0
    assert accuracy_reward("<think>it is 7</think> 8", "7") == 0.0  # the reasoning's numbers do not count
    assert final_answer("<think>x</think>so \\boxed{\\frac{1}{2}} it is") == "\\frac{1}{2}"
    assert accuracy_reward("the answer is \\boxed{42}", "42") == 1.0
    assert accuracy_reward("\\boxed{4", "4") == 0.0  # unbalanced box: the whole text is the answer
    assert format_reward("<think>add them</think>7") == 1.0
    assert format_reward("\n<think>\na\nb\n</think>\n\n7\n") == 1.0
    for bad in ("7", "<think>no close 7", "<think>a</think>", "<think>a</think><think>b</think>7",
                "7<think>a</think>8", "<think><think>a</think>7"):
        assert format_reward(bad) == 0.0, bad


def test_unit_test_reward_runs_code_in_a_subprocess_with_a_timeout():
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
    good = "<think>sum</think>\n```python\ndef add(a, b):\n    return a + b\n```"
    assert extract_code(good) == "def add(a, b):\n    return a + b\n"
    assert unit_test_reward(good, tests) == 1.0
    assert unit_test_reward("def add(a, b):\n    return a - b\n", tests) == 0.0  # a failed assert
    crash = run_unit_tests("import os\ndef add(a, b):\n    os.abort()\n", tests)
    assert not crash.passed and crash.returncode not in (0, None) and not crash.timed_out
    raising = run_unit_tests("def add(a, b):\n    raise ValueError('boom')\n", tests)
    assert not raising.passed and "ValueError: boom" in raising.output
    t0 = time.perf_counter()
    hang = run_unit_tests("import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'while 1: pass'])\n"
                          "while True:\n    pass\n", tests, timeout=1.0)
    assert hang.timed_out and not hang.passed and hang.reward == 0.0
    assert time.perf_counter() - t0 < 5
    syntax = run_unit_tests("def add(a, b) return a + b", tests)
    assert not syntax.passed and "SyntaxError" in syntax.output


# ---- rollouts through the engine ----------------------------------------------------------------------


def test_engine_rollouts_share_prompt_blocks_and_refresh_drops_stale_kv(base):
    from selfseek.train.grpo import EngineRollouts

    tok = Tokenizer.from_dir(base)
    policy = load_checkpoint(base, dtype="float32", progress=False)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "12+34=56+78="}],
                                                add_generation_prompt=True))
    assert len(prompt) > 8
    ro = EngineRollouts(policy, tok, max_num_seqs=8, max_seq_len=64, block_size=4)
    stats = ro.engine.stats
    group = ro.sample([prompt], 4, 6, 1.0, seeds=[7])[0]
    assert len(group) == 4 and all(1 <= len(c) <= 6 for c in group)
    full_blocks = (len(prompt) - 1) // 4
    assert stats()["prefix_cache_hit_tokens"] == 3 * full_blocks * 4  # 3 siblings reuse the leader's blocks
    assert ro.sample([prompt], 4, 6, 1.0, seeds=[7])[0] == group  # seeded: reproducible

    # greedy through the engine equals recomputing the whole sequence per token
    (old,), = ro.sample([prompt], 1, 8, 0.0)
    assert old == greedy_tokens(policy, prompt, 8, tok.eos_id)
    hits = stats()["prefix_cache_hit_tokens"]
    ro.sample([prompt], 1, 8, 0.0)
    assert stats()["prefix_cache_hit_tokens"] == hits + full_blocks * 4  # same weights: the prompt is cached

    # new weights (LoRA with non-zero B, merged into the engine's copy): no stale block is reused
    apply_lora(policy, 4, 8.0, ["q_b_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
               experts=True)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in policy.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.3)
            elif isinstance(m, LoRAExperts):
                for b in m.lora_B.values():
                    b.normal_(0, 0.3)
    ro.refresh(policy)
    hits = stats()["prefix_cache_hit_tokens"]
    (new,), = ro.sample([prompt], 1, 8, 0.0)
    assert stats()["prefix_cache_hit_tokens"] == hits
    want = greedy_tokens(policy, prompt, 8, tok.eos_id)
    assert new == want and new != old
    with torch.no_grad():  # the engine's copy holds the merged weights
        q = ro.model.model.layers[0].self_attn.q_b_proj.weight
        assert torch.allclose(q, policy.model.layers[0].self_attn.q_b_proj.weight, atol=1e-6)
        experts = policy.model.layers[1].mlp.experts
        want_up = experts.base.up_proj + experts.delta("up_proj")
        assert torch.allclose(ro.model.model.layers[1].mlp.experts.up_proj, want_up, atol=1e-6)


# ---- GRPO ---------------------------------------------------------------------------------------------


def test_grpo_through_the_engine_raises_the_arithmetic_reward(sft_base, tmp_path):
    from selfseek.train.grpo import run_grpo

    cfg = load_config("grpo", None, [
        f"base={sft_base}", f"out_dir={tmp_path / 'grpo'}", "threads=1", "grpo.progress=false",
        "task.max_operand=2", "task.n_eval=25", "grpo.steps=30", "grpo.prompts_per_step=8", "grpo.group_size=8",
        "grpo.max_new_tokens=3", "grpo.eval_every=0", "grpo.engine_block_size=4", "optim.lr=2e-3",
        "optim.warmup_steps=2",
    ])
    res = run_grpo(cfg)
    log = read_metrics(tmp_path / "grpo" / "metrics.jsonl")
    rewards = [r["reward"] for r in log if "reward" in r]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"GRPO: eval reward (sampled) {res['eval_reward_start']:.3f} -> {res['eval_reward_end']:.3f}, "
          f"greedy {res['eval_greedy_start']:.2f} -> {res['eval_greedy_end']:.2f}, train reward first/last 5 steps "
          f"{first:.3f} -> {last:.3f}, rollouts {res['rollout_tokens_per_s']:.0f} tokens/s")
    assert res["eval_reward_end"] > res["eval_reward_start"] + 0.1
    assert last > first + 0.1
    assert all(r["rollout_tokens_per_s"] > 0 for r in log if "reward" in r)
    assert (tmp_path / "grpo" / "reward.png").is_file()
    assert (tmp_path / "grpo" / "final" / "model.safetensors").is_file()


def test_grpo_resumed_from_a_checkpoint_equals_the_uninterrupted_run(sft_base, tmp_path):
    from safetensors.torch import load_file

    from selfseek.train.grpo import run_grpo

    common = [f"base={sft_base}", "threads=1", "grpo.progress=false", "task.max_operand=2", "task.n_eval=2",
              "grpo.eval_samples=2", "grpo.steps=4", "grpo.prompts_per_step=4", "grpo.group_size=4",
              "grpo.max_new_tokens=3", "grpo.eval_every=0", "grpo.checkpoint_every=2", "optim.lr=2e-3"]
    run_grpo(load_config("grpo", None, [*common, f"out_dir={tmp_path / 'a'}"]))
    run_grpo(load_config("grpo", None, [*common, f"out_dir={tmp_path / 'b'}",
                                        f"grpo.resume={tmp_path / 'a' / 'checkpoints' / 'step_0000002'}"]))
    a, b = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    tail = [{k: r[k] for k in ("step", "reward", "loss", "kl")} for r in a if r["step"] > 2 and "loss" in r]
    assert [{k: r[k] for k in ("step", "reward", "loss", "kl")} for r in b if "loss" in r] == tail
    wa, wb = (load_file(tmp_path / run / "final" / "model.safetensors") for run in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ---- DPO ----------------------------------------------------------------------------------------------


def test_dpo_loss_follows_the_paper():
    from selfseek.train.dpo import dpo_loss

    logp = torch.tensor([[-3.0, -5.0], [-2.0, -1.0]])
    ref = torch.tensor([[-4.0, -4.0], [-2.5, -1.5]])
    loss, margin = dpo_loss(logp, ref, beta=0.5)
    want = torch.tensor([(-3 + 4) - (-5 + 4), (-2 + 2.5) - (-1 + 1.5)])
    assert torch.allclose(margin, want)
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(0.5 * want).mean().item())


def _pairs(path: Path, problems, rng) -> None:
    """A concise answer (chosen) against a hedging one (rejected): a preference a random model can learn."""
    with path.open("w") as f:
        for p in problems:
            rejected = f"{p.answer} or {int(p.answer) + rng.choice([-2, -1, 1, 2])}"
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.answer, "rejected": rejected}) + "\n")


def test_dpo_with_lora_raises_the_held_out_margin(base, tmp_path):
    import random

    from selfseek.train.dpo import run_dpo

    task = Arithmetic(max_operand=9, ops="+")
    problems = list({p.prompt: p for p in task.problems(300, seed=5)}.values())
    rng = random.Random(0)
    _pairs(tmp_path / "train.jsonl", problems[:40], rng)
    _pairs(tmp_path / "valid.jsonl", problems[40:56], rng)  # other problems
    cfg = load_config("dpo", None, [
        f"base={base}", f"out_dir={tmp_path / 'dpo'}", "threads=1", "dpo.progress=false",
        f"data.train={tmp_path / 'train.jsonl'}", f"data.valid={tmp_path / 'valid.jsonl'}", "dpo.steps=10",
        "dpo.batch_size=8", "dpo.eval_every=5", "dpo.beta=0.1", "lora.r=8", "lora.alpha=16",
        "optim.lr=1e-2", "optim.warmup_steps=2",
    ])
    res = run_dpo(cfg)
    log = read_metrics(tmp_path / "dpo" / "metrics.jsonl")
    print(f"DPO held-out margin {res['val_margin_start']:.3f} -> {res['val_margin_end']:.3f}, "
          f"accuracy {res['val_accuracy_end']:.2f}; train loss {log[1]['loss']:.3f} -> {log[-1]['loss']:.3f}")
    assert res["val_margin_start"] == 0.0  # the policy starts as the reference
    assert res["val_margin_end"] > 1.0 and res["val_accuracy_end"] >= 0.9
    assert (tmp_path / "dpo" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "dpo" / "final" / "model.safetensors").is_file()


def test_bad_preference_lines_are_named(tmp_path):
    from selfseek.train.dpo import read_pairs

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "2+2=", "chosen": "4"}\n')
    with pytest.raises(TrainConfigError, match=r"p\.jsonl:2: expected an object with 'prompt', 'chosen'"):
        read_pairs([str(f)])
    f.write_text('{"prompt": "1+1=", "chosen": [{"role": "user", "content": "2"}], "rejected": "3"}\n')
    with pytest.raises(TrainConfigError, match=r"p\.jsonl:1: 'chosen' must be"):
        read_pairs([str(f)])
    from selfseek.train.cli import main

    assert main(["dpo", "--set", f"data.train={f}", "--print-config"]) == 0
    assert main(["dpo", "--set", "dpo.stepz=1"]) == 1  # unknown key: a clear error, exit status 1
