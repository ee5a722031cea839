"""Builds selfseek's C++ kernels once per machine and picks the instruction set at run time.

Each `selfseek/kernels/<name>.cpp` is plain C++ with a C ABI (no torch headers, so it compiles in seconds,
not the minutes torch's cpp_extension takes) and OpenMP for threads. It is compiled into one shared library
per instruction-set level (`ISAS`: the same source, `#ifdef __AVX512F__` / `__AVX2__` paths), cached under
`$SELFSEEK_CACHE_DIR` (default `~/.cache/selfseek`) by a SHA-256 of source and the shared headers (`*.h`),
compiler and flags, and loaded with ctypes. `build_all()` compiles every level (paths this CPU cannot run are
still compiled, so a compile error shows up anywhere); `library(name)` loads the best level this CPU runs, or the
one named by `SELFSEEK_ISA` (generic, avx2, avx512, avx512vnni) so each dispatch path is testable on a bigger CPU.
`load(name, bind)` is what the kernel wrappers call: that library with its C signatures declared, loaded on
first use; `reset()` makes the next use read SELFSEEK_NO_KERNELS / SELFSEEK_ISA again (tests switch paths so).

Threads: the library links `libgomp.so.1`, the same soname torch's CPU wheel loads, so both share one
OpenMP pool and `torch.set_num_threads` governs the kernels too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
HERE = Path(__file__).parent

# Levels from least to most capable; each is a superset of the one before on x86-64.
ISAS: dict[str, list[str]] = {
    "generic": [],
    "avx2": ["-march=x86-64-v3"],  # AVX2, FMA, F16C
    "avx512": ["-march=x86-64-v4"],  # + AVX-512 F/BW/DQ/VL
    "avx512vnni": ["-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16"],
}
_CPU_FLAGS_OF = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl"},
    "avx512vnni": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni",
                   "avx512_bf16"},
}
BASE_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno", "-Wall"]


class KernelBuildError(RuntimeError):
    pass


def _cpuinfo(field: str) -> str:
    """The first `field` line's value in /proc/cpuinfo ('' when there is none: not Linux, or not x86)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> set[str]:
    return set(_cpuinfo("flags").split())


def supported_isas() -> list[str]:
    """The levels this CPU can execute, least capable first."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["generic"]
    flags = cpu_flags()
    return ["generic"] + [isa for isa, need in _CPU_FLAGS_OF.items() if need <= flags]


def buildable_isas() -> list[str]:
    return list(ISAS) if platform.machine() in ("x86_64", "AMD64") else ["generic"]


def chosen_isa() -> str:
    """The best level this CPU runs, or SELFSEEK_ISA when set (an error when this CPU cannot run it)."""
    forced = os.environ.get("SELFSEEK_ISA")
    ok = supported_isas()
    if forced:
        if forced not in ISAS:
            raise KernelBuildError(f"SELFSEEK_ISA={forced!r}: must be one of {', '.join(ISAS)}")
        if forced not in ok:
            raise KernelBuildError(f"SELFSEEK_ISA={forced!r}: this CPU runs only {', '.join(ok)}")
        return forced
    return ok[-1]


@functools.cache
def panels_for_gemm() -> bool:
    """Whether compute-bound products of packed weights (kernels.GEMM_MIN_ROWS rows of x and more: prefill) run
    through the kernels' own float weight panels instead of BLAS on dequantized tiles. BLAS won on AVX2 (AMD Zen 3),
    the panels on an AMD CPU running the AVX-512 kernels (Zen 4, where MKL's sgemm takes its AVX2 path): q8 3072 x
    1024 times 512 rows 37.0 against 45.0 ms at 1 thread, 18.1 against 23.9 at 2; on Intel's AVX-512 MKL has its own
    AVX-512 kernels, so BLAS stays. SELFSEEK_GEMM=panels|blas forces one (read again after reset())."""
    forced = os.environ.get("SELFSEEK_GEMM")
    if forced:
        if forced not in ("panels", "blas"):
            raise KernelBuildError(f"SELFSEEK_GEMM={forced!r}: must be panels or blas")
        return forced == "panels"
    return chosen_isa().startswith("avx512") and _cpuinfo("vendor_id") == "AuthenticAMD"


def cache_dir() -> Path:
    root = os.environ.get("SELFSEEK_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "selfseek")
    return Path(root) / "kernels"


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise KernelBuildError("no C++ compiler found (install g++ or set CXX)")
    return cxx


@functools.cache
def _compiler_id(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0]


def library_path(name: str, isa: str) -> Path:
    """Where the compiled library for this source, compiler and level lives (built or not)."""
    cxx = _compiler()
    src = b"\0".join(p.read_bytes() for p in [HERE / f"{name}.cpp", *sorted(HERE.glob("*.h"))])
    key = hashlib.sha256(b"\0".join([src, _compiler_id(cxx).encode(), " ".join(BASE_FLAGS + ISAS[isa]).encode()]))
    return cache_dir() / f"{name}-{isa}-{key.hexdigest()[:16]}.so"


def build(name: str, isa: str) -> Path:
    """Compile kernels/<name>.cpp for one level unless the cache has it; -> the library's path."""
    out = library_path(name, isa)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [_compiler(), *BASE_FLAGS, *ISAS[isa], str(HERE / f"{name}.cpp"), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise KernelBuildError(f"compiling {name}.cpp for {isa} failed:\n{proc.stderr[-4000:]}")
    os.replace(tmp, out)  # atomic: a concurrent builder never sees a half-written library
    return out


def build_all(names: list[str] | None = None) -> list[Path]:
    """Compile every kernel source at every level this platform's compiler targets."""
    names = names or sorted(p.stem for p in HERE.glob("*.cpp"))
    return [build(n, isa) for n in names for isa in buildable_isas()]


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """The loaded kernel library at the chosen level; None when disabled (SELFSEEK_NO_KERNELS=1) or when
    it cannot be built (a warning says why; callers fall back to torch)."""
    if os.environ.get("SELFSEEK_NO_KERNELS"):
        return None
    isa = chosen_isa()  # a bad SELFSEEK_ISA is an error, not a silent fallback
    try:
        path = build(name, isa)
        import torch  # noqa: F401  (loads torch's libgomp first, so the kernels share its thread pool)

        lib = ctypes.CDLL(str(path))
    except (KernelBuildError, OSError) as e:
        log.warning("selfseek: %s kernels unavailable (%s); using the torch fallback", name, e)
        return None
    log.info("selfseek: %s kernels, %s path", name, isa)
    return lib


@functools.cache
def load(name: str, bind: Callable[[ctypes.CDLL], ctypes.CDLL]) -> ctypes.CDLL | None:
    """`library(name)` with its C signatures declared by `bind`, once; None: the caller runs its torch fallback.
    Cached, as wrappers call it on every op (a decode step makes hundreds of calls)."""
    lib = library(name)
    return None if lib is None else bind(lib)


def reset() -> None:
    """Forget the loaded libraries: the next `load` / `library` reads SELFSEEK_NO_KERNELS and SELFSEEK_ISA again."""
    load.cache_clear()
    library.cache_clear()
    panels_for_gemm.cache_clear()


def main() -> None:
    for p in build_all():
        print(p)
    print(f"this CPU runs: {', '.join(supported_isas())}; chosen: {chosen_isa()}; "
          f"prefill products of packed weights: {'panels' if panels_for_gemm() else 'BLAS'}")


if __name__ == "__main__":
    main()
