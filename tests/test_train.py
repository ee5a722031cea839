"""Training: pretraining (MTP, balance), exact resume, data parallelism, export parity, SFT/LoRA, GRPO, errors.

Models here are tiny (hidden 64) and runs a few steps long, with one torch thread (fastest at this size).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from selfseek.tokenizer import Tokenizer
from selfseek.train.balance import bias_update, load_ratio, sequence_balance_loss
from selfseek.train.config import TrainConfigError, load_config
from selfseek.train.data import (
    IGNORE,
    ChatExamples,
    Document,
    encode_chat,
    encode_documents,
    read_documents,
    stdlib_files,
)
from selfseek.train.lora import load_adapter
from selfseek.train.optim import lr_at
from selfseek.train.plots import read_metrics
from selfseek.train.pretrain import setup_pretrain
from selfseek.train.tasks import Arithmetic
from selfseek.train.tokenizer_train import ASSISTANT, BOS, EOS, FIM_BEGIN, FIM_END, FIM_HOLE, PAD, USER
from selfseek.weights.safetensors import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent

TINY = [
    "threads=1", "train.progress=false", "tokenizer.vocab_size=512", "data.seq_len=64", "data.fim_rate=0.5",
    "model.hidden_size=64", "model.intermediate_size=128", "model.moe_intermediate_size=32",
    "model.num_hidden_layers=3", "model.num_attention_heads=2", "model.q_lora_rank=32", "model.kv_lora_rank=32",
    "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16", "model.n_routed_experts=8",
    "model.num_experts_per_tok=2", "model.n_group=2", "model.topk_group=2", "model.max_position_embeddings=256",
    "train.batch_size=8", "train.micro_batch_size=4", "train.log_every=1", "train.eval_every=4",
    "train.eval_batches=2", "train.checkpoint_every=0", "optim.lr=3e-3", "optim.warmup_steps=2",
    "optim.min_lr=3e-4", "train.bias_update_speed=0.01",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 40 small stdlib modules as a code corpus."""
    out = tmp_path_factory.mktemp("corpus")
    files = [f for f in stdlib_files() if f.parent.name.startswith("python3") and 2_000 < f.stat().st_size < 12_000]
    for f in files[:40]:
        (out / f.name).write_text(f.read_text(encoding="utf-8", errors="replace"))
    return out


def pretrain(out: Path, corpus: Path, *overrides: str):
    cfg = load_config("pretrain", None, [*TINY, f"out_dir={out}", f"data.train={corpus}", *overrides])
    trainer = setup_pretrain(cfg)
    summary = trainer.run()
    return trainer, summary


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus):
    """An uninterrupted 8-step run (the reference), exported to final/."""
    out = tmp_path_factory.mktemp("pretrain")
    trainer, _ = pretrain(out, corpus, "train.steps=8")
    return out, trainer


# ---- tokenizer, data, schedule ------------------------------------------------------------------------


def test_tokenizer_has_deepseek_special_tokens_and_v3_chat_template(pretrained):
    out, _ = pretrained
    tok = Tokenizer.from_dir(out / "final")
    assert [tok.token_to_id(t) for t in (BOS, EOS, PAD)] == [0, 1, 2]
    assert all(tok.token_to_id(t) is not None for t in (USER, ASSISTANT, FIM_BEGIN, FIM_HOLE, FIM_END, "<think>"))
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
    assert tok.apply_chat_template(msgs) == f"{BOS}S{USER}u1{ASSISTANT}a1{EOS}{USER}u2{ASSISTANT}"
    ids = tok.encode(f"{FIM_BEGIN}x = 1{FIM_HOLE}")
    assert ids[0] == 0 and tok.token_to_id(FIM_BEGIN) in ids and tok.token_to_id(FIM_HOLE) == ids[-1]
    # digits split one by one (DeepSeek-Coder pre-tokenizer): arithmetic sees every digit
    assert tok.decode(tok.encode("12345", add_special_tokens=False)[:1]) == "1"


def test_fim_rewrites_documents_in_psm_order(pretrained):
    import tokenizers

    out, _ = pretrained
    raw = tokenizers.Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    text = "def add(a, b):\n    return a + b\n"
    stream = encode_documents([Document("d", text)], raw, fim_rate=1.0, seed=3).tolist()
    ids = {t: raw.token_to_id(t) for t in (BOS, EOS, FIM_BEGIN, FIM_HOLE, FIM_END)}
    assert stream[:2] == [ids[BOS], ids[FIM_BEGIN]] and stream[-1] == ids[EOS]
    h, e = stream.index(ids[FIM_HOLE]), stream.index(ids[FIM_END])
    pre, suf, mid = raw.decode(stream[2:h]), raw.decode(stream[h + 1 : e]), raw.decode(stream[e + 1 : -1])
    assert pre + mid + suf == text
    plain = encode_documents([Document("d", text)], raw, fim_rate=0.0, seed=3).tolist()
    assert plain[0] == ids[BOS] and plain[-1] == ids[EOS] and raw.decode(plain[1:-1]) == text


def test_lr_schedule_warms_up_then_follows_the_cosine():
    cfg = load_config("pretrain", None, ["optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=4"]).optim
    assert [lr_at(s, 104, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(54, 104, cfg) == pytest.approx(0.55)
    assert lr_at(104, 104, cfg) == pytest.approx(0.1)


# ---- export parity -------------------------------------------------------------------------------------


def test_exported_checkpoint_logits_match_transformers_fp32(pretrained):
    import transformers

    out, trainer = pretrained
    final = out / "final"
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        bias = f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names and "model.layers.1.mlp.gate.weight" in names
    mtp = "model.layers.3."  # num_hidden_layers = 3: the MTP module, stored like V3's layer 61
    for rest in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight",
                 "mlp.experts.0.gate_proj.weight", "mlp.gate.e_score_correction_bias"):
        assert mtp + rest in names
    assert bias.dtype == torch.float32 and bias.abs().max() > 0  # the bias update ran and was exported

    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ours = load_checkpoint(final, dtype="float32", progress=False)
    assert len(ours.mtp) == 1
    ids = torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
        trained = trainer.model.eval()(ids)
        trainer.model.train()
    assert (got - ref).abs().max().item() <= 1e-4
    assert (got - trained).abs().max().item() <= 1e-5
    for p in ("loss.png", "expert_load.png", "metrics.jsonl"):
        assert (out / p).is_file()


# ---- balance ------------------------------------------------------------------------------------------


def test_bias_update_follows_its_formula():
    bias = torch.tensor([0.1, -0.2, 0.0, 0.3])
    load = torch.tensor([10, 2, 4, 4])  # mean 5: expert 0 overloaded, 1-3 underloaded
    bias_update(bias, load, gamma=0.01)
    assert torch.allclose(bias, torch.tensor([0.09, -0.19, 0.01, 0.31]))
    bias = torch.zeros(3)
    bias_update(bias, torch.tensor([3, 3, 3]), gamma=0.5)  # balanced: sign(0) = 0, nothing moves
    assert torch.equal(bias, torch.zeros(3))


def test_sequence_balance_loss_follows_v3_eq_17_to_20():
    torch.manual_seed(0)
    b, t, e, k = 2, 5, 6, 2
    s = torch.rand(b, t, e)
    got = sequence_balance_loss(s, k)
    want = 0.0
    for i in range(b):
        top = s[i].topk(k, dim=-1).indices
        for j in range(e):
            f = e / (k * t) * sum(int(j in top[n].tolist()) for n in range(t))
            p = sum(s[i, n, j] / s[i, n].sum() for n in range(t)) / t
            want += f * p
    assert got.item() == pytest.approx(float(want), rel=1e-6)


def test_bias_update_lowers_expert_load_imbalance(tmp_path, corpus):
    """At this learning rate the routers collapse within a few steps: nearly every token goes to the same two
    of the eight experts (max/mean near E/K = 4). 30 steps without and with the aux-loss-free update (gamma
    0.01); the balance loss is off so that only the bias update can rebalance."""
    ratios = {}
    for gamma in (0.0, 0.01):
        cfg = load_config("pretrain", None, [*TINY, f"out_dir={tmp_path / str(gamma)}", f"data.train={corpus}",
                                             "train.steps=30", "train.eval_every=0", "train.seq_aux_alpha=0",
                                             "train.mtp_weight=0", f"train.bias_update_speed={gamma}"])
        trainer = setup_pretrain(cfg)
        trainer.run()
        last = [v for r in trainer.history[-5:] for v in r["expert_load"].values()]
        ratios[gamma] = sum(last) / len(last)
    print(f"max/mean expert load, last 5 steps: bias update off {ratios[0.0]:.2f}, on {ratios[0.01]:.2f}")
    assert ratios[0.0] > 3.0
    assert ratios[0.01] < 0.6 * ratios[0.0]


def test_load_ratio():
    assert load_ratio(torch.tensor([4, 4, 4, 4])) == 1.0
    assert load_ratio(torch.tensor([8, 8, 0, 0])) == 2.0


# ---- resume ------------------------------------------------------------------------------------------


def test_resume_after_a_stop_reproduces_the_uninterrupted_run(tmp_path, corpus, pretrained):
    _, reference = pretrained
    out = tmp_path / "interrupted"
    first, _ = pretrain(out, corpus, "train.steps=8", "train.stop_after=5", "train.checkpoint_every=3")
    assert [r["step"] for r in first.history] == [1, 2, 3, 4, 5]
    assert (out / "checkpoints" / "step_0000005" / "state.pt").is_file()
    second, summary = pretrain(out, corpus, "train.steps=8", "train.resume=auto", "train.checkpoint_every=3")
    assert [r["step"] for r in second.history] == [6, 7, 8]
    want = {r["step"]: r for r in reference.history}
    for r in first.history + second.history:
        assert r["loss"] == want[r["step"]]["loss"], r["step"]
        assert r["expert_load"] == want[r["step"]]["expert_load"]
    assert summary["val_loss"] == reference.history[-1]["val_loss"]
    for a, b in zip(second.model.parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(a, b)
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 8
    # a checkpoint exports to the same Hugging Face folder as the run's own final/
    from selfseek.train.export import export_checkpoint

    exported = export_checkpoint(out / "checkpoints" / "step_0000008", tmp_path / "exported")
    with safe_open(str(exported / "model.safetensors"), "pt") as a, \
            safe_open(str(out / "final" / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


# ---- data parallel ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_torchrun_match_one_process(tmp_path, corpus, pretrained):
    out0, _ = pretrained
    common = [*TINY, f"data.train={corpus}", f"tokenizer.path={out0 / 'tokenizer'}", "train.steps=4",
              "train.micro_batch_size=2", "train.eval_every=2", "optim.eps=1e-3"]
    # AdamW with eps=1e-8 turns fp32 re-association noise in a near-zero gradient element into a visible
    # weight change (one process with micro-batches of 1, 2 or 4 already differs by up to 7e-5 in one
    # embedding element); eps=1e-3 keeps the update a smooth function of the gradient, so the weights below
    # compare DDP's reduced gradients, not rounding luck (same runs: 1e-8 apart)
    single = tmp_path / "one"
    pretrain(single, corpus, *common[len(TINY) :])
    double = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "selfseek.train", "pretrain"]
    for o in [*common, f"out_dir={double}"]:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = read_metrics(single / "metrics.jsonl"), read_metrics(double / "metrics.jsonl")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "mtp_loss", "balance_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
        assert a["tokens_seen"] == b["tokens_seen"]
    # DDP's reduced gradients give the same weights as one process (fp32 summation order aside)
    with safe_open(str(single / "final" / "model.safetensors"), "pt") as f1, \
            safe_open(str(double / "final" / "model.safetensors"), "pt") as f2:
        assert set(f1.keys()) == set(f2.keys())
        for k in f1.keys():
            torch.testing.assert_close(f2.get_tensor(k), f1.get_tensor(k), rtol=1e-4, atol=1e-5, msg=k)


# ---- SFT and LoRA ----------------------------------------------------------------------------------------


def test_sft_labels_only_assistant_tokens(pretrained):
    out, _ = pretrained
    tok = Tokenizer.from_dir(out / "final")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3="},
            {"role": "assistant", "content": "6 it is"}]
    ids, labels = encode_chat(msgs, tok)
    assert ids == tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=False))
    learned = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE]
    assert tok.decode(learned) == f"4{EOS}6 it is{EOS}"
    assert all(lab in (IGNORE, t) for t, lab in zip(ids, labels, strict=True))
    # the prompt side (system, user turns, role tokens) carries no loss
    masked = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE])
    assert masked == f"{BOS}be brief{USER}2+2={ASSISTANT}{USER}3+3={ASSISTANT}"
    (inputs, targets), = ChatExamples([msgs], tok, max_len=512).items
    assert inputs.tolist() == ids[:-1] and targets.tolist() == labels[1:]


def _arith_sft(base: Path, out: Path, data: Path, *overrides: str) -> dict:
    from selfseek.train.sft import setup_sft

    cfg = load_config("sft", None, [
        f"base={base}", f"out_dir={out}", f"data.train={data}", "threads=1", "train.progress=false",
        "train.log_every=1", "train.eval_every=0", "data.valid_fraction=0", *overrides,
    ])
    trainer = setup_sft(cfg)
    return trainer.run() | {"history": trainer.history}


def test_sft_with_lora_trains_and_exports(pretrained, tmp_path):
    out, _ = pretrained
    data = tmp_path / "arith.jsonl"
    Arithmetic().write_jsonl(data, 64, seed=0)
    res = _arith_sft(out / "final", tmp_path / "sft", data, "train.steps=8", "train.batch_size=8",
                     "train.micro_batch_size=8", "lora.r=4", "optim.lr=1e-2", "optim.warmup_steps=1")
    assert (tmp_path / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    merged = load_checkpoint(tmp_path / "sft" / "final", progress=False)
    base = load_checkpoint(out / "final", progress=False)
    with_adapter = load_adapter(base, tmp_path / "sft" / "adapter")
    ids = torch.randint(3, 500, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (merged(ids) - with_adapter(ids)).abs().max().item() <= 1e-5
    losses = [r["loss"] for r in res["history"]]
    assert sum(losses[-2:]) / 2 < losses[0] - 0.3, losses


# ---- GRPO --------------------------------------------------------------------------------------------


# GRPO through the engine, its rewards and DPO: tests/test_rl.py


def test_packed_rows_equal_the_models_own_batched_forward(pretrained):
    from selfseek.train.grpo import packed_logits

    out, _ = pretrained
    model = load_checkpoint(out / "final", progress=False)
    ids = torch.randint(3, 500, (9, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids)
        for seg in (13, 40, 2048):  # one row per segment, a few, all
            assert (packed_logits(model, ids, seg) - ref).abs().max().item() <= 1e-5


def test_grpo_pieces():
    from selfseek.train.grpo import group_advantages, grpo_loss, k3_kl

    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3)
    assert torch.equal(adv[1], torch.zeros(4))  # all rewards equal: no signal
    logp, ref = torch.log(torch.tensor([[0.5, 0.2]])), torch.log(torch.tensor([[0.25, 0.4]]))
    assert torch.allclose(k3_kl(logp, ref), torch.tensor([[0.5 - torch.log(torch.tensor(0.5)) - 1,
                                                            2 - torch.log(torch.tensor(2.0)) - 1]]))
    # the ratio is clipped on the side the advantage pushes
    lp = torch.log(torch.tensor([[0.9]]))
    old = torch.log(torch.tensor([[0.5]]))
    loss, _ = grpo_loss(lp, old, lp, torch.tensor([1.0]), torch.ones(1, 1), clip_eps=0.2, beta=0.0)
    assert loss.item() == pytest.approx(-1.2)
    loss, _ = grpo_loss(lp, old, lp, torch.tensor([-1.0]), torch.ones(1, 1), clip_eps=0.2, beta=0.0)
    assert loss.item() == pytest.approx(1.8)
    assert Arithmetic.reward(" 7\n", "7") == 1.0 and Arithmetic.reward("17", "7") == 0.0


# ---- bad input ----------------------------------------------------------------------------------------


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.py").write_text("")
    with pytest.raises(TrainConfigError, match="no documents"):
        read_documents([str(tmp_path / "empty")], [".py"])
    with pytest.raises(TrainConfigError, match="nothing_here"):
        read_documents([str(tmp_path / "nothing_here" / "*.txt")])
    cfg = load_config("pretrain", None, [*TINY, f"out_dir={tmp_path / 'o'}", f"data.train={tmp_path / 'empty'}"])
    with pytest.raises(TrainConfigError, match="no documents"):
        setup_pretrain(cfg)


def test_unknown_config_keys_are_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  stepz: 10\n")
    with pytest.raises(TrainConfigError, match=r"train\.stepz.*did you mean 'steps'"):
        load_config("pretrain", f)
    t = tmp_path / "c.toml"
    t.write_text("[optim]\nlr = 'fast'\n")
    with pytest.raises(TrainConfigError, match=r"optim\.lr: expected float"):
        load_config("pretrain", t)
    with pytest.raises(TrainConfigError, match="unknown config key pretrain.modle"):
        load_config("pretrain", None, ["modle.hidden_size=8"])
    from selfseek.train.cli import main

    assert main(["pretrain", "--set", "train.stepz=3"]) == 1


@pytest.mark.parametrize("name", ["tiny-coder", "sft-arithmetic", "grpo-arithmetic"])
def test_shipped_configs_load(name):
    job = {"tiny-coder": "pretrain", "sft-arithmetic": "sft", "grpo-arithmetic": "grpo"}[name]
    cfg = load_config(job, ROOT / "configs" / "train" / f"{name}.yaml")
    assert cfg.out_dir.startswith("runs/")


def test_unknown_model_field_is_named(tmp_path, corpus):
    cfg = load_config("pretrain", None, [*TINY, f"out_dir={tmp_path}", f"data.train={corpus}",
                                         "model.hidden_sise=64"])
    with pytest.raises(TrainConfigError, match="hidden_sise"):
        setup_pretrain(cfg)


def test_checkpoint_of_another_shape_is_a_clear_error(tmp_path, corpus, pretrained):
    out = tmp_path / "a"
    pretrain(out, corpus, "train.steps=1", "train.checkpoint_every=1", "train.eval_every=0",
             f"tokenizer.path={pretrained[0] / 'tokenizer'}")
    cfg = load_config("pretrain", None, [*TINY, f"out_dir={tmp_path / 'b'}", f"data.train={corpus}",
                                         "model.hidden_size=96", "train.steps=2",
                                         f"tokenizer.path={pretrained[0] / 'tokenizer'}",
                                         f"train.resume={out / 'checkpoints' / 'step_0000001'}"])
    trainer = setup_pretrain(cfg)
    with pytest.raises(TrainConfigError, match=r"model\.embed_tokens\.weight.*\[\d+, 64\].*\[\d+, 96\]"):
        trainer.run()


def test_make_data_cli_writes_chat_jsonl(tmp_path):
    from selfseek.cli import main

    assert main(["train", "make-data", "arithmetic", "--n", "5", "--out", str(tmp_path / "a.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and rows[0]["messages"][1]["role"] == "assistant"
    rng = random.Random(0)
    p = Arithmetic().sample(rng)
    assert p.prompt.endswith("=") and str(eval(p.prompt[:-1])) == p.answer
