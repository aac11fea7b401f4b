import os
import random

import numpy as np
import pytest
import torch

# Tests run on CPU with tiny models; keep them deterministic and light on threads.
torch.set_num_threads(1)  # tiny models: one thread is fastest, and the CI machine has 2 cores
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
