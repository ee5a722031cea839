"""Native CPU kernels, compiled on first use for the machine they run on (torch.utils.cpp_extension).

`quant_linear` / `dequantize` run block-quantized weights (see quant.cpp). When the extension cannot be
built (no compiler) or SELFSEEK_NO_KERNELS=1 is set, the same math runs in plain torch (slower).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_ext = None
_tried = False
GEMM_MIN_ROWS = 16  # from this many rows on, dequantize once and use sgemm (prefill); fewer: packed dot products


def _load():
    global _ext, _tried
    if _tried:
        return _ext
    _tried = True
    if os.environ.get("SELFSEEK_NO_KERNELS") or not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        return None
    try:
        from torch.utils.cpp_extension import load

        flags = ["-O3", "-march=native", "-fopenmp"]
        _ext = load("selfseek_quant", [str(Path(__file__).with_name("quant.cpp"))], extra_cflags=flags,
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no headers: fall back to torch
        log.warning("selfseek: native quantized kernels unavailable (%s); using the torch fallback", e)
        _ext = None
    return _ext


def available() -> bool:
    return _load() is not None


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, q4: bool) -> torch.Tensor:
    """Block-quantized [out, in] weight -> float32."""
    if qweight.device.type == "cpu" and (ext := _load()) is not None:
        return ext.dequantize(qweight, scales, mins, q4)
    if q4:  # a block's 16 bytes hold values 0..15 in low nibbles, 16..31 in high nibbles
        b = qweight.view(qweight.shape[0], -1, 16)
        q = torch.cat([b & 0x0F, b >> 4], dim=-1).float()
    else:
        q = qweight.view(qweight.shape[0], -1, 32).float()
    w = q * scales.float()[..., None]
    if mins is not None:
        w = w + mins.float()[..., None]
    return w.view(qweight.shape[0], -1)


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 q4: bool) -> torch.Tensor:
    """y = x W^T (float32) for a block-quantized W."""
    if x.device.type == "cpu" and (ext := _load()) is not None:
        return ext.linear(x, qweight, scales, mins, q4, GEMM_MIN_ROWS)
    return torch.nn.functional.linear(x.float(), dequantize(qweight, scales, mins, q4))
