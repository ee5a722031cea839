"""`selfseek bench` code paths on a tiny model: weight bytes per token, the table, JSON and plot. No timings."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from checkpoints import add_tokenizer, save_hf_checkpoint
from gguf import GGMLQuantizationType as T

from selfseek import bench
from selfseek.weights.gguf_writer import write_gguf
from selfseek.weights.safetensors import load_checkpoint


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench_v3")
    save_hf_checkpoint("v3_noaux", path)
    add_tokenizer(path)
    return path


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_active_bytes_read_top_k_of_the_routed_experts_and_one_embedding_row(v3):
    model = load_checkpoint(v3, progress=False)
    cfg = model.config
    params = dict(model.named_parameters())
    routed = sum(_bytes(p) for n, p in params.items() if ".mlp.experts." in n)
    embed = _bytes(params["model.embed_tokens.weight"])
    assert routed > 0 and "lm_head.weight" in params  # an untied head: the embedding reads one row
    got = bench.active_weight_bytes(model)
    assert got["routed_experts"] == routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    assert got["embedding_row"] == embed // cfg.vocab_size == cfg.hidden_size * 4
    assert got["other"] == sum(_bytes(p) for p in params.values()) - routed - embed
    assert got["total"] == sum(v for k, v in got.items() if k != "total")


def test_gguf_active_bytes_match_the_loaded_float_model(v3, tmp_path):
    model = load_checkpoint(v3, progress=False)
    path = tmp_path / "v3.gguf"
    write_gguf(path, model, T.F32)
    from_file = bench.gguf_active_bytes(path)
    loaded = bench.active_weight_bytes(model)
    assert from_file["routed_experts"] == loaded["routed_experts"]
    assert from_file["embedding_row"] == loaded["embedding_row"]
    # the file splits kv_b into k_b / v_b and stores the same floats: the same bytes either way
    assert from_file["total"] == pytest.approx(loaded["total"], rel=0.01)


def test_q8_0_gguf_active_bytes_count_the_split_kv_b_halves_read():
    """Loaded from a Q8_0 GGUF, MLA decodes from the file's packed attn_k_b / attn_v_b, not kv_b_proj's float
    copy: the bytes a token reads are the file's, exactly."""
    from checkpoints import tiny_model

    from selfseek.weights import load_model

    model = tiny_model("v3_noaux", "deepseek_v3", qk_nope_head_dim=32, v_head_dim=32, kv_lora_rank=64, q_lora_rank=64)
    with __import__("tempfile").TemporaryDirectory() as d:
        write_gguf(f"{d}/v3.gguf", model, T.Q8_0)
        loaded, _ = load_model(f"{d}/v3.gguf", progress=False)
        assert bench.active_weight_bytes(loaded) == bench.gguf_active_bytes(f"{d}/v3.gguf")


def test_tied_head_reads_the_whole_shared_matrix(v3):
    model = load_checkpoint(v3, progress=False)
    untied = bench.active_weight_bytes(model)
    head = _bytes(model.lm_head.weight)
    model.lm_head.weight = model.model.embed_tokens.weight  # tie: one matrix, read in full by the head
    tied = bench.active_weight_bytes(model)
    assert tied["embedding_row"] == 0
    assert tied["other"] == untied["other"]  # the head's bytes, now the shared matrix's: the same size
    assert tied["total"] == untied["total"] - untied["embedding_row"] and head == _bytes(model.lm_head.weight)


def _result(engine, scenario, requests, out_len, tok_s, itl_ms=None, ttft_ms=100.0, prefill=None):
    r = bench.Result(engine, scenario, requests, 16, out_len, 1.0, tok_s, prefill_tok_s=prefill,
                     ttft_ms={"mean": ttft_ms, "p50": ttft_ms, "p99": 2 * ttft_ms})
    if itl_ms:
        r.itl_ms = {"mean": itl_ms, "p50": itl_ms, "p99": 2 * itl_ms}
    return r


def test_table_ratios_are_selfseek_speed_over_peer_speed():
    config = {"model": "/m/x.gguf", "threads": 1, "read_bandwidth_gbs": 10.0,
              "active_bytes": {"selfseek": {"total": 100_000_000}, "llama.cpp": {"total": 50_000_000}},
              "results": [_result("selfseek", "prefill", 1, 1, 1.0, prefill=300.0),
                          _result("llama.cpp", "prefill", 1, 1, 1.0, prefill=100.0),
                          _result("selfseek", "decode 1x16", 1, 8, 9.0, itl_ms=50.0),
                          _result("llama.cpp", "decode 1x16", 1, 8, 9.0, itl_ms=25.0),
                          _result("selfseek", "decode c=4", 4, 8, 80.0, itl_ms=40.0, ttft_ms=100.0),
                          _result("llama.cpp", "decode c=4", 4, 8, 40.0, itl_ms=80.0, ttft_ms=400.0)]}
    rows = {r["metric"]: r for r in bench.table_rows(config)}
    assert rows["prefill 16 tok/s"]["selfseek"] == 300.0
    assert rows["decode 1 stream @16 tok/s"]["selfseek"] == pytest.approx(20.0)  # 1 / 50 ms
    assert rows["c=4 TTFT p50/p99 ms"]["llama.cpp"] == (400.0, 800.0)
    assert rows["bandwidth bound tok/s"]["selfseek"] == pytest.approx(100.0)  # 10 GB/s / 100 MB
    assert rows["% of bandwidth bound"]["selfseek"] == pytest.approx(20.0)
    assert rows["% of bandwidth bound"]["llama.cpp"] == pytest.approx(20.0)  # 40 tok/s of 200
    table = bench.format_table([config])
    line = {ln.split(" | ")[1]: ln for ln in table.splitlines()[2:]}
    assert line["prefill 16 tok/s"].endswith("| 3.00x |")
    assert line["decode 1 stream @16 tok/s"].endswith("| 0.50x |")
    assert line["c=4 aggregate tok/s"].endswith("| 2.00x |")
    assert line["c=4 TTFT p50/p99 ms"].endswith("| 4.00x |")  # lower is better: peer / selfseek


def test_bf16_compute_is_refused_on_a_cpu_without_it(monkeypatch):
    monkeypatch.setattr(bench, "cpu_flags", lambda: {"avx2", "fma"})
    with pytest.raises(SystemExit, match="bfloat16"):
        bench._check_dtype("bfloat16", "cpu")
    bench._check_dtype("auto", "cpu")
    bench._check_dtype("float32", "cpu")
    monkeypatch.setattr(bench, "cpu_flags", lambda: {"avx512_bf16"})
    bench._check_dtype("bfloat16", "cpu")


def test_bench_end_to_end_writes_json_and_plot(v3, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    out = tmp_path / "b.json"
    png = tmp_path / "b.png"
    args = parser.parse_args(["bench", "--model", str(v3), "--dtype", "float32", "--input-len", "24",
                              "--short-len", "8", "--output-len", "3", "--concurrency", "1,3", "--threads", "1",
                              "--repeat", "2", "--profile", "4", "--json", str(out), "--plot", str(png)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "| v3_noaux" not in printed and "c=3 aggregate tok/s" in printed and "decode step breakdown" in printed
    data = json.loads(out.read_text())
    assert [c["threads"] for c in data] == [1]
    scenarios = [r["scenario"] for r in data[0]["results"]]
    assert scenarios == ["prefill", "decode 1x24", "decode c=1", "decode c=3", "profile c=4"]
    c3 = next(r for r in data[0]["results"] if r["scenario"] == "decode c=3")
    assert c3["requests"] == 3 and c3["output_tok_s"] > 0 and c3["extra"]["preemptions"] == 0
    assert {r["metric"] for r in data[0]["table"]} >= {"prefill 24 tok/s", "% of bandwidth bound"}
    # the native step's one C call times its own parts: each seen, together within the step
    parts = next(r for r in data[0]["results"] if r["scenario"] == "profile c=4")["extra"]
    assert parts["streams per step"] == 4  # the KV pool holds the profile's 4 streams of 24 + 40 tokens at once
    assert min(parts["attention"], parts["router"], parts["moe"], parts["dense_mlp"]) > 0
    assert parts["attention"] + parts["router"] + parts["moe"] + parts["dense_mlp"] < parts["step"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
