"""config.json of each family, in the released spellings and in transformers v5's, and loud failures."""

from __future__ import annotations

import json

import pytest

from selfseek.config import ConfigError, ModelConfig

# Trimmed copies of released config.json files (fields as DeepSeek ships them).
V3_RELEASED = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                             "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                             "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}
V2_LITE_RELEASED = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "aux_loss_alpha": 0.001,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "model_type": "deepseek_v2", "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
    "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "topk_group": 1, "topk_method": "gready", "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 102400,
}
CODER_V1_RELEASED = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 32013, "eos_token_id": 32021, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5504, "max_position_embeddings": 16384,
    "model_type": "llama", "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16,
    "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": {"factor": 4.0, "type": "linear"},
    "rope_theta": 100000, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32256,
}


def test_v3_released_config():
    c = ModelConfig.from_dict(V3_RELEASED)
    assert (c.topk_method, c.scoring_func, c.n_group, c.topk_group) == ("noaux_tc", "sigmoid", 8, 4)
    assert c.kv_values_per_token_per_layer == 576
    assert c.fp8 is not None and c.fp8.block_size == (128, 128)
    assert c.rope.type == "yarn" and c.rope.factor == 40
    # 192^-0.5 * (0.1 * 1.0 * ln 40 + 1)^2 (reference notes §3.2)
    assert c.softmax_scale() == pytest.approx(192**-0.5 * 1.873854, rel=1e-6)
    assert c.is_moe_layer(3) and not c.is_moe_layer(2)


def test_v2_lite_released_config_with_the_gready_spelling():
    c = ModelConfig.from_dict(V2_LITE_RELEASED)
    assert c.q_lora_rank is None and c.topk_method == "greedy" and c.scoring_func == "softmax"
    assert c.softmax_scale() == pytest.approx(192**-0.5 * 1.589626, rel=1e-5)


def test_coder_v1_linear_rope():
    c = ModelConfig.from_dict(CODER_V1_RELEASED)
    assert not c.is_mla and c.rope.type == "linear" and c.rope.factor == 4.0 and c.rope.theta == 100000
    assert c.kv_values_per_token_per_layer == 2 * 16 * 128


def test_rope_parameters_spelling_equals_rope_scaling_spelling():
    old = dict(V3_RELEASED)
    new = dict(V3_RELEASED)
    new["rope_parameters"] = {**new.pop("rope_scaling"), "rope_theta": new.pop("rope_theta"), "rope_type": "yarn"}
    del new["rope_parameters"]["type"]
    assert ModelConfig.from_dict(old) == ModelConfig.from_dict(new)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "mistral"}, "model_type"),
        ({"sliding_window_size": 4096}, "sliding_window_size"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"topk_method": "random"}, "topk_method"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.type"),
        ({"rope_scaling": {**V3_RELEASED["rope_scaling"], "alpha": 3}}, "alpha"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quant_method"),
        ({"num_experts_per_tok": None}, "num_experts_per_tok"),
    ],
)
def test_unknown_or_unsupported_fields_fail_with_the_field_name(tmp_path, change, field):
    (tmp_path / "config.json").write_text(json.dumps({**V3_RELEASED, **change}))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_file(tmp_path)
    assert field in str(e.value) and "config.json" in str(e.value)


def test_config_json_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)


# The R1 distills' config.json files, as released (DeepSeek-R1-Distill-Qwen-7B / -1.5B, -Llama-8B, R1-0528-Qwen3-8B).
R1_DISTILL_QWEN_7B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.44.0",
    "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": 152064,
}
R1_DISTILL_LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 12288, "max_position_embeddings": 131072, "max_window_layers": 36, "model_type": "qwen3",
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def test_r1_distill_qwen_config():
    c = ModelConfig.from_dict(R1_DISTILL_QWEN_7B)
    assert (c.model_type, c.qkv_bias, c.attention_bias, c.qk_norm) == ("qwen2", True, False, False)
    assert (c.num_key_value_heads, c.head_dim, c.rope.theta) == (4, 128, 10000)
    c15 = ModelConfig.from_dict({**R1_DISTILL_QWEN_7B, "hidden_size": 1536, "num_attention_heads": 12,
                                 "num_key_value_heads": 2, "tie_word_embeddings": True})
    assert c15.tie_word_embeddings and c15.head_dim == 128
    for bad, field in (({"use_sliding_window": True}, "sliding_window"), ({"use_mrope": True}, "use_mrope")):
        with pytest.raises(ConfigError, match=field):
            ModelConfig.from_dict({**R1_DISTILL_QWEN_7B, **bad})


def test_r1_0528_qwen3_config():
    c = ModelConfig.from_dict(QWEN3_8B)
    assert (c.model_type, c.qk_norm, c.qkv_bias, c.attention_bias, c.head_dim) == ("qwen3", True, False, False, 128)
    assert c.softmax_scale() == 128**-0.5 and c.rope.theta == 1e6


def test_r1_distill_llama_llama3_rope():
    c = ModelConfig.from_dict(R1_DISTILL_LLAMA_8B)
    r = c.rope
    assert (r.type, r.factor, r.low_freq_factor, r.high_freq_factor, r.original_max_position_embeddings) == \
        ("llama3", 8.0, 1.0, 4.0, 8192)
    assert not c.qkv_bias and not c.qk_norm and c.head_dim == 128


def test_yarn_attn_factor_is_accepted_and_read_as_transformers_reads_it(tmp_path):
    """`attn_factor` in a YaRN rope_scaling (vLLM's / llama.cpp's name) loads; transformers 5.24 ignores it (an
    unrecognized key), so the logits equal transformers' and those of the same checkpoint without it."""
    import torch
    import transformers

    from selfseek.weights.safetensors import load_checkpoint

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "attn_factor": 0.5}
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                   rope_scaling=yarn, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    ids = torch.randint(2, 128, (1, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        got = load_checkpoint(tmp_path, progress=False)(ids)
    assert (got - want).abs().max() <= 1e-4
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_parameters"].pop("attn_factor") == 0.5  # it really was in the checkpoint
    (tmp_path / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path, progress=False)(ids), got)
