import importlib
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # tiny models: one thread is faster and immune to busy cores


def load(name):
    """The numbered files start with a digit, so they are imported by name."""
    return importlib.import_module(name)


@pytest.fixture
def vit():
    return load("02_vit")
