import os

import pytest
import torch

# Tests are small; two threads keep them from oversubscribing CI's two cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)
