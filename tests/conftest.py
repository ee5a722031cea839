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
