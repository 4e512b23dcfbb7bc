import importlib
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
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


def make_image_folder(root, labels, per_split):
    """An ImageFolder (ROOT/split/class/i.png) of embedded-dataset textures, e.g. per_split={"train": 6, "val": 3}."""
    data = load("data")
    rng = np.random.RandomState(0)
    for split, n in per_split.items():
        for label in labels:
            d = root / split / data.TEXTURES[label]
            d.mkdir(parents=True)
            for i in range(n):
                data.draw_texture(rng, label, 32).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """A tiny ImageFolder of 2 classes: 12 training and 6 validation images."""
    return make_image_folder(tmp_path_factory.mktemp("imgs"), (0, 1), {"train": 6, "val": 3})


def png_claiming(width, height):
    """A PNG written by hand, whose header claims any size (PIL refuses beyond 2 x 89 million pixels)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
