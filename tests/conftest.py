import sys
from pathlib import Path

import pytest
import torch

# tests/ helpers (tiny checkpoint builders) import as top-level modules
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second torch thread only adds contention on the 2-core CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def kernel_env(monkeypatch):
    """kernel_env(SELFSEEK_ISA="avx2") / kernel_env(SELFSEEK_NO_KERNELS="1") (None: unset): the kernel switches for the
    rest of the test; every kernel library loads again under them, and again under the old ones after the test."""
    from selfseek.kernels import build

    def switch(**env: str | None) -> None:
        for name, value in env.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        build.reset()

    yield switch
    build.reset()  # monkeypatch restores the variables after this; the next load reads them
