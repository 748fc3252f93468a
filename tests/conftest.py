import os

import pytest
import torch

# Tests are small: the cores are shared among pytest-xdist's workers (one each on CI's two
# cores with `-n 2`), at most two threads per process.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)
