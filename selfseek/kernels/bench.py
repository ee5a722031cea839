"""Micro-benchmark of the CPU kernels: `python -m selfseek.kernels.bench [--size 4096 | --shape NxK] [--threads 1,2]`.

Per weight kind and batch rows M: milliseconds per y = x W^T call (best of several), GB/s of weight bytes read
(the figure that bounds decode), billions of weights per second, and the same product through a whole-weight
float32 copy and torch.mm (the path quantized layers took before for M >= 16) for comparison; with --int8 also
the opt-in int8-activation path (SELFSEEK_INT8_ACTIVATIONS) for quantized kinds and M <= kernels.int8_max_rows().
Kinds: f32, bf16, f16, q8, q4 (models/quant.py's int8/int4), the packed formats q2_k .. q6_k, fp8, fp4 (random
bytes) and q8_0x16 (q8 16 rows interleaved, as the int8 engine re-stores it). --shape NxK times a non-square [N out,
K in] weight instead of --size's square one: a big one (e.g. the medium V3 lm_head, 129280x1024) is read from DRAM
on every call, as in decode. With --moe: one routed-experts layer of the medium bench model's shape (64 experts of
1024 -> 256 -> 1024, top-6), fused kernel against the per-expert loop (Experts._forward_torch), with --int8 also the
fused kernel with int8 activations. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from selfseek import kernels
from selfseek.kernels import build


def best_ms(fn: Callable[[], object], min_time: float = 0.3, max_calls: int = 200) -> float:
    """Best time of one call. With one thread it is the process's CPU time, so other processes sharing the
    cores do not inflate it; with more, wall time."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    fn()
    best, spent, calls = float("inf"), 0.0, 0
    while spent < min_time and calls < max_calls:
        t0 = clock()
        fn()
        dt = clock() - t0
        best, spent, calls = min(best, dt), spent + dt, calls + 1
    return best * 1e3


# fp16 fields of a K-quant super-block (d, dmin): set to small finite values in the random bytes.
_FP16_AT = {"q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}


def packed_weight(kind: str, n: int, k: int) -> kernels.Packed:
    """A packed weight of random bytes (every code and scale pattern; the speed does not depend on the values)."""
    from selfseek.models.quant import pack_fp4, pack_fp8

    g = torch.Generator().manual_seed(0)
    if kind == "fp8":
        w = (torch.randn(n, k, generator=g) * 100).to(torch.float8_e4m3fn)
        return pack_fp8(w, torch.rand(-(-n // 128), -(-k // 128), generator=g) * 1e-3)
    if kind == "fp4":
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
        return pack_fp4(w, torch.randint(118, 130, (n, k // 32), dtype=torch.uint8, generator=g))
    _, unit, size = kernels.FORMATS[kind]
    b = torch.randint(0, 256, (n, k // unit, size), dtype=torch.uint8, generator=g)
    for at in _FP16_AT[kind]:
        d = (torch.randn(n, k // unit, generator=g) * 0.01).half()
        b[:, :, at : at + 2] = d.view(torch.uint8).reshape(n, k // unit, 2)
    return kernels.Packed(kind, b.reshape(n, -1), torch.empty(n, 0, dtype=torch.uint8), k)


def weight(kind: str, n: int, k: int) -> kernels.Weight:
    from selfseek.models.quant import quantize_weight

    w = torch.randn(n, k) * 0.02
    if kind == "q8_0x16":  # q8 as the int8 engine re-stores it
        q, d, _ = quantize_weight(w, 8)
        return kernels.Packed(kind, kernels.interleave_q8(q, d), torch.empty(n, 0, dtype=torch.uint8), k)
    if kind in kernels.FORMATS:
        return packed_weight(kind, n, k)
    if kind in ("q8", "q4"):
        return quantize_weight(w, 8 if kind == "q8" else 4)
    return w.to({"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[kind])


def nbytes(w: kernels.Weight) -> int:
    """Storage bytes of a kernel weight: a float tensor, (values, scales[, mins]) or a Packed file encoding."""
    if isinstance(w, kernels.Packed):
        return w.data.nbytes + w.scales.nbytes
    return sum(t.nbytes for t in ((w,) if isinstance(w, torch.Tensor) else w) if t is not None)


def int8_ms(x: torch.Tensor, w: kernels.Weight) -> float:
    """Best ms of the int8-activation path, or nan where it does not apply."""
    saved, kernels.INT8_ACTIVATIONS = kernels.INT8_ACTIVATIONS, True
    try:
        return best_ms(lambda: kernels.linear(x, w)) if kernels.takes_int8(w, x.shape[0]) else float("nan")
    finally:
        kernels.INT8_ACTIVATIONS = saved


def run(shape: tuple[int, int], threads: list[int], rows: list[int], kinds: list[str], int8: bool = False) -> None:
    n, k = shape
    print(f"kernels: {build.chosen_isa() if kernels.available() else 'torch fallback'}; W {n}x{k}")
    print(f"{'kind':>5} {'thr':>3} {'M':>5} {'ms':>9} {'GB/s':>7} {'Gw/s':>6} {'ms via fp32 copy+mm':>20}"
          + (f" {'int8 ms':>9} {'int8 GB/s':>9}" if int8 else ""))
    for kind in kinds:
        w = weight(kind, n, k)
        for t in threads:
            torch.set_num_threads(t)
            for m in rows:
                x = torch.randn(m, k)
                saved, kernels.INT8_ACTIVATIONS = kernels.INT8_ACTIVATIONS, False  # the float path
                ms = best_ms(lambda: kernels.linear(x, w))  # noqa: B023
                kernels.INT8_ACTIVATIONS = saved
                old = best_ms(lambda: x @ kernels.to_float(w).T) if m >= 4 else float("nan")  # noqa: B023
                gbs, gws = nbytes(w) / ms / 1e6, n * k / ms / 1e6
                line = f"{kind:>5} {t:>3} {m:>5} {ms:9.3f} {gbs:7.1f} {gws:6.2f} {old:20.3f}"
                if int8:
                    i8 = int8_ms(x, w)
                    line += f" {i8:9.3f} {nbytes(w) / i8 / 1e6:9.1f}"
                print(line)


def run_moe(threads: list[int], tokens: list[int], kinds: list[str], n_experts: int = 64, hidden: int = 1024,
            inter: int = 256, top_k: int = 6, int8: bool = False) -> None:
    from types import SimpleNamespace

    from selfseek.models.moe import Experts
    from selfseek.models.quant import QuantStack

    print(f"MoE layer: {n_experts} experts {hidden} -> {inter} -> {hidden}, top-{top_k}")
    print(f"{'kind':>5} {'thr':>3} {'tokens':>6} {'fused ms':>9} {'loop ms':>9}" + (f" {'int8 ms':>9}" if int8 else ""))
    for kind in kinds:
        if kind not in ("q8", "q4", "f32", "bf16"):
            raise SystemExit(f"--moe takes the kinds q8, q4, f32, bf16, not {kind!r}")
        experts = Experts(SimpleNamespace(n_routed_experts=n_experts, moe_intermediate_size=inter, hidden_size=hidden))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(experts, proj).data.normal_(0, 0.02)
            if kind in ("q8", "q4"):
                stack = QuantStack(n_experts, w.shape[2], w.shape[1], 8 if kind == "q8" else 4)
                for e in range(n_experts):
                    stack.set_from_float(e, w[e])
                delattr(experts, proj)
                setattr(experts, proj, stack)
            else:
                getattr(experts, proj).data = w.to({"f32": torch.float32, "bf16": torch.bfloat16}[kind])
        for t in threads:
            torch.set_num_threads(t)
            for n in tokens:
                x = torch.randn(n, hidden)
                ids = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(n)])
                w = torch.rand(n, top_k)
                saved, kernels.INT8_ACTIVATIONS = kernels.INT8_ACTIVATIONS, False  # the float path
                with torch.no_grad():
                    fused = best_ms(lambda: experts(x, w, ids))  # noqa: B023
                    loop = best_ms(lambda: experts._forward_torch(x, w, ids))  # noqa: B023
                    i8 = float("nan")
                    if int8 and kind in ("q8", "q4"):  # the fused kernel's int8 twin
                        kernels.INT8_ACTIVATIONS = True
                        i8 = best_ms(lambda: experts(x, w, ids))  # noqa: B023
                kernels.INT8_ACTIVATIONS = saved
                print(f"{kind:>5} {t:>3} {n:>6} {fused:9.3f} {loop:9.3f}" + (f" {i8:9.3f}" if int8 else ""))


def _shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: expected NxK, e.g. 129280x1024") from None
    if n <= 0 or k <= 0:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: N and K must be positive")
    return n, k


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096, help="a square size x size weight")
    p.add_argument("--shape", type=_shape, help="NxK: a [N out, K in] weight instead (overrides --size)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rows", default="1,4,16,64,512")
    p.add_argument("--kinds", default="q8,q4,bf16,f32", help=f"of f32,bf16,f16,q8,q4,{','.join(kernels.FORMATS)}")
    p.add_argument("--moe", action="store_true", help="benchmark the fused MoE layer instead")
    p.add_argument("--int8", action="store_true", help="also time the int8-activation path (quantized kinds)")
    a = p.parse_args()
    if a.moe:
        run_moe([int(t) for t in a.threads.split(",")], [int(r) for r in a.rows.split(",")], a.kinds.split(","),
                int8=a.int8)
        return
    run(a.shape or (a.size, a.size), [int(t) for t in a.threads.split(",")], [int(r) for r in a.rows.split(",")],
        a.kinds.split(","), a.int8)


if __name__ == "__main__":
    main()
