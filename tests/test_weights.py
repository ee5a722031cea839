"""Malformed checkpoints give one clear error naming the file and tensor, in the API and the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from checkpoints import build_hf_model
from safetensors.torch import load_file, save_file

from selfseek.config import ConfigError
from selfseek.weights.safetensors import CheckpointError, load_checkpoint


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    build_hf_model("v2_lite_greedy").save_pretrained(folder, max_shard_size="100KB")
    return folder


@pytest.fixture
def broken(sharded, tmp_path):
    """A fresh copy of the sharded checkpoint to break."""
    dst = tmp_path / "ckpt"
    shutil.copytree(sharded, dst)
    return dst


def _shard_of(folder, tensor: str) -> str:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def test_missing_shard_names_the_file_and_a_tensor_it_holds(broken):
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    shard = _shard_of(broken, name)
    (broken / shard).unlink()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(broken, progress=False)
    assert shard in str(e.value) and "missing" in str(e.value) and "model.layers." in str(e.value)


def test_tensor_of_the_wrong_shape_names_file_tensor_and_shapes(broken):
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    shard = broken / _shard_of(broken, name)
    state = load_file(shard)
    state[name] = state[name][:, :-1].contiguous()
    save_file(state, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(broken, progress=False)
    msg = str(e.value)
    assert shard.name in msg and name in msg and str(list(state[name].shape)) in msg


def test_truncated_safetensors_file_is_named(broken):
    name = "model.layers.2.mlp.shared_experts.up_proj.weight"
    shard = broken / _shard_of(broken, name)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(broken, progress=False)
    assert shard.name in str(e.value)


def test_missing_tensor_is_named(broken):
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    shard = broken / _shard_of(broken, name)
    state = load_file(shard)
    del state[name]
    save_file(state, shard, metadata={"format": "pt"})
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(broken, progress=False)
    assert "model.layers.2.mlp.experts.down_proj" in str(e.value) and "5" in str(e.value)


def test_unexpected_tensor_is_named(broken):
    name = "model.layers.0.self_attn.o_proj.weight"
    shard = broken / _shard_of(broken, name)
    state = load_file(shard)
    state["model.layers.0.self_attn.wq_extra.weight"] = torch.zeros(2, 2)
    save_file(state, shard, metadata={"format": "pt"})
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.wq_extra.weight"] = shard.name
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="wq_extra"):
        load_checkpoint(broken, progress=False)


def test_unknown_model_type_names_the_field(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "qwen3_moe"
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type"):
        load_checkpoint(broken, progress=False)


def test_cli_reports_a_broken_checkpoint_in_one_line_without_a_traceback(broken):
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    (broken / _shard_of(broken, name)).unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "selfseek.cli", "generate", "--model", str(broken), "--prompt", "hi"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("selfseek: error:") and "missing" in lines[0]
