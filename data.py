"""Datasets for train.py and 06_knn.py: an ImageFolder directory, or a built-in name.

`shapes` (the default) is generated here, needs no download and is the same on every machine:
ten shape classes drawn at random position, size, rotation and colour on a random textured
background. What separates the classes is the outline alone, the thing DINO's augmentations
(colour jitter, crops at many scales) teach a network to attend to; raw pixels, dominated by
colour and position, classify it poorly.
"""
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

BUILTIN = ("shapes", "cifar10", "cifar100", "stl10")
SHAPES = ("circle", "ring", "square", "frame", "triangle", "cross", "star", "crescent", "bar", "dots")
CACHE = Path(os.environ.get("DINO_DATA", Path.home() / ".cache" / "dino-data"))


class DataError(Exception):
    """Bad data input: the message names the problem and the fix."""


def _polygon(cx, cy, r, n, rot, inner=None):
    pts = []
    for i in range(n * (2 if inner else 1)):
        a = rot + math.pi * i / n if inner else rot + 2 * math.pi * i / n
        rr = inner * r if inner and i % 2 else r
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _rotated_rect(cx, cy, w, h, rot):
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in ((-w, -h), (w, -h), (w, h), (-w, h))]


def draw_shape(rng, label, size=64):
    """One image of class `label`: the outline drawn as a mask at 4x (smooth edges), painted in a
    random colour over a random two-colour gradient with noise."""
    S = size * 4
    fg, bg1, bg2 = rng.randint(0, 256, 3), rng.randint(0, 256, 3), rng.randint(0, 256, 3)
    while np.abs(fg - (bg1 + bg2) / 2).sum() < 200:  # keep the shape visible
        fg = rng.randint(0, 256, 3)
    t = np.linspace(0, 1, size)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = ((np.cos(angle) * t[:, None] + np.sin(angle) * t[None, :]) / 2 + 0.5)[..., None]
    bg = bg1 * (1 - ramp) + bg2 * ramp + rng.normal(0, 20, (size, size, 1))  # (size, size, 3)
    mask = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(mask)
    r = rng.uniform(0.22, 0.4) * S
    cx, cy = rng.uniform(r, S - r), rng.uniform(r, S - r)
    rot = rng.uniform(0, 2 * math.pi)
    name = SHAPES[label]
    if name in ("circle", "ring", "crescent"):
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    if name == "ring":
        d.ellipse([cx - 0.7 * r, cy - 0.7 * r, cx + 0.7 * r, cy + 0.7 * r], fill=0)
    elif name == "crescent":
        ox, oy = cx + 0.5 * r * math.cos(rot), cy + 0.5 * r * math.sin(rot)
        d.ellipse([ox - 0.8 * r, oy - 0.8 * r, ox + 0.8 * r, oy + 0.8 * r], fill=0)
    elif name in ("square", "frame"):
        d.polygon(_polygon(cx, cy, r, 4, rot), fill=255)
        if name == "frame":
            d.polygon(_polygon(cx, cy, 0.6 * r, 4, rot), fill=0)
    elif name == "triangle":
        d.polygon(_polygon(cx, cy, r, 3, rot), fill=255)
    elif name == "cross":
        d.polygon(_rotated_rect(cx, cy, r, r * 0.25, rot), fill=255)
        d.polygon(_rotated_rect(cx, cy, r, r * 0.25, rot + math.pi / 2), fill=255)
    elif name == "star":
        d.polygon(_polygon(cx, cy, r, 5, rot, inner=0.4), fill=255)
    elif name == "bar":
        d.polygon(_rotated_rect(cx, cy, r, r * 0.3, rot), fill=255)
    elif name == "dots":
        for k in range(3):
            a = rot + 2 * math.pi * k / 3
            x, y, rd = cx + 0.62 * r * math.cos(a), cy + 0.62 * r * math.sin(a), 0.3 * r
            d.ellipse([x - rd, y - rd, x + rd, y + rd], fill=255)
    alpha = np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float64)[..., None] / 255
    return Image.fromarray((bg * (1 - alpha) + fg * alpha).clip(0, 255).astype(np.uint8))


class ShapesDataset(torch.utils.data.Dataset):
    """The embedded dataset: `per_class` images of each of the ten shapes, fixed by `split`."""

    def __init__(self, split="train", transform=None, per_class=None, size=64):
        per_class = per_class or {"train": 500, "val": 100}[split]
        rng = np.random.RandomState({"train": 0, "val": 1}[split])
        self.targets = [i % len(SHAPES) for i in range(per_class * len(SHAPES))]
        self.images = np.stack([np.asarray(draw_shape(rng, y, size)) for y in self.targets])  # (n, size, size, 3)
        self.classes, self.transform = list(SHAPES), transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), self.targets[i]


class SafeImageFolder:
    """torchvision's ImageFolder, but an unreadable file is skipped with one warning naming it
    (a few corrupt files in a million should not end a run of days)."""

    def __new__(cls, root, transform=None):
        from torchvision.datasets import ImageFolder

        class _Safe(ImageFolder):
            def __getitem__(self, i):
                for k in range(16):
                    try:
                        return super().__getitem__((i + k) % len(self))
                    except OSError as e:
                        warnings.warn(f"skipping unreadable image {self.samples[(i + k) % len(self)][0]}: {e}")
                raise DataError(f"16 unreadable images in a row near index {i} in {root}: check the data")

        try:
            return _Safe(root, transform=transform)
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(f"no images in {root} ({e}); expected ROOT/class_name/image.jpg") from None


def _torchvision(name, split, transform, download_dir):
    from torchvision import datasets
    download_dir = Path(download_dir or CACHE)
    train = split == "train"
    try:
        if name == "stl10":
            return datasets.STL10(download_dir, split="train+unlabeled" if split == "pretrain" else
                                  ("train" if train else "test"), transform=transform, download=True)
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        return cls(download_dir, train=split in ("train", "pretrain"), transform=transform, download=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise DataError(f"cannot get {name} into {download_dir} ({type(e).__name__}: {e}); when offline, download it "
                        f"on a machine with internet into that folder (or set DINO_DATA), or pass an ImageFolder "
                        f"directory as --data_path") from None


def build_dataset(data_path, split, transform=None, download_dir=None):
    """split: 'pretrain' (what DINO trains on), 'train' or 'val' (the k-NN memory bank and queries)."""
    if data_path in BUILTIN:
        if data_path == "shapes":
            return ShapesDataset("val" if split == "val" else "train", transform)
        return _torchvision(data_path, split, transform, download_dir)
    root = Path(data_path)
    if not root.is_dir():
        raise DataError(f"--data_path {data_path} is neither a directory nor a built-in dataset "
                        f"({', '.join(BUILTIN)})")
    sub = root / ("val" if split == "val" else "train")
    if sub.is_dir():
        root = sub
    elif split == "val":
        raise DataError(f"{data_path} has no val/ folder; k-NN evaluation needs ROOT/train and ROOT/val")
    return SafeImageFolder(str(root), transform)


if __name__ == "__main__":
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = ShapesDataset("val", per_class=4)
    fig, axes = plt.subplots(4, 10, figsize=(12, 5))
    for ax, i in zip(axes.flat, range(len(ds))):
        img, y = ds[i]
        ax.imshow(img), ax.axis("off")
    for ax, name in zip(axes[0], SHAPES):
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig("shapes.png", dpi=80)
    print(f"saved shapes.png ({len(ds)} images)")
