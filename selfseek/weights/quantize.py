"""`selfseek quantize`: a checkpoint folder -> the same model with int8 / int4 block-quantized weights.

The output is a checkpoint folder selfseek loads back: safetensors holding, per quantized layer,
`P.qweight`, `P.scales` (and `P.mins` for 4-bit) under the Hugging Face tensor names, and config.json with
`quantization_config: {"quant_method": "selfseek", "bits": 8|4, "group_size": 32}`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from selfseek.weights.safetensors import _hf_name, load_checkpoint

SHARD_BYTES = 4 << 30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


def quantize_checkpoint(src: str | Path, out: str | Path, bits: int, progress: bool = True) -> Path:
    src, out = Path(src), Path(out)
    model = load_checkpoint(src, dtype="auto", progress=progress, quantize=bits)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:  # tied embedding / head: stored once, as model.embed_tokens.*
            continue
        seen.add(t.data_ptr())
        if size and size + t.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][_hf_name(name, model.config)] = t.contiguous()
        size += t.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "selfseek", "bits": bits, "group_size": 32}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy(src / f, out / f)
    return out
