"""Datasets by name, for train.py and the evaluation scripts: an ImageFolder directory, or a built-in name.

`textures` (the default) is generated here, needs no download and is the same on every machine:
ten pattern classes (stripes, checkers, dots, rings, ...) drawn in gray levels at a random period,
phase, slight tilt, brightness and contrast, with pixel noise. Every crop of an image, global or
local, shows its class, and what changes between images of a class is what DINO's augmentations
teach a network to ignore: scale and position (resized crops), brightness and contrast (colour
jitter). Its limits: a k-NN on the raw pixels already classifies it well, and a ViT needs
colour variation within that of colour jitter: with fully random colours, the short runs of the
course learned colour instead of pattern.

Images are read with images.py (robust decoding, the shrink cache); the dataset makers, `python data.py --make
NAME DIR`, are in makers.py; the training loader is in loader.py.
"""
import functools
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from images import KEEP_BYTES, DataError, ShrunkImages, open_image, shrunk_bytes  # noqa: F401 (data.DataError)

BUILTIN = ("textures", "scenes", "cifar10", "cifar100", "stl10")
TEXTURES = ("hstripes", "vstripes", "checker", "dots", "rings", "grid", "diagonals", "blobs", "waves", "rays")
PER_CLASS = {"train": 500, "val": 100}  # images of each pattern in the embedded splits
CACHE = Path(os.environ.get("DINO_DATA", Path.home() / ".cache" / "dino-data"))


def draw_texture(rng, label, size=64):
    """One image of class `label`: a binary pattern m(x, y) painted light on dark, plus noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    tilt = rng.uniform(-0.25, 0.25)  # radians: small, so horizontal and vertical stay apart
    u, v = x * math.cos(tilt) - y * math.sin(tilt), x * math.sin(tilt) + y * math.cos(tilt)
    p = rng.uniform(7, 14)  # period in pixels
    u, v = u + rng.uniform(0, p), v + rng.uniform(0, p)  # phase
    cx, cy = rng.uniform(0, size, 2)  # centre of rings and rays
    name = TEXTURES[label]
    if name == "hstripes":
        m = np.sin(2 * np.pi * v / p) > 0
    elif name == "vstripes":
        m = np.sin(2 * np.pi * u / p) > 0
    elif name == "checker":
        m = np.sin(2 * np.pi * u / p) * np.sin(2 * np.pi * v / p) > 0
    elif name == "dots":
        m = np.sin(np.pi * u / p) ** 2 + np.sin(np.pi * v / p) ** 2 < 0.6
    elif name == "rings":
        m = np.sin(2 * np.pi * np.hypot(x - cx, y - cy) / p) > 0
    elif name == "grid":
        m = (np.abs(np.sin(np.pi * u / p)) < 0.3) | (np.abs(np.sin(np.pi * v / p)) < 0.3)
    elif name == "diagonals":
        m = (np.abs(np.sin(np.pi * (u + v) / p / 1.4)) < 0.3) | (np.abs(np.sin(np.pi * (u - v) / p / 1.4)) < 0.3)
    elif name == "blobs":  # smooth noise, thresholded at its median
        n = rng.normal(size=(size // 8 + 2, size // 8 + 2))
        n = Image.fromarray(((n - n.min()) / np.ptp(n) * 255).astype(np.uint8))
        n = np.asarray(n.resize((size + 16, size + 16), Image.BICUBIC), dtype=np.float64)[8:-8, 8:-8]
        m = n > np.median(n)
    elif name == "waves":
        m = np.sin(2 * np.pi * (v + 0.25 * p * np.sin(2 * np.pi * u / (2.5 * p))) / p) > 0
    elif name == "rays":
        m = np.sin(rng.randint(5, 9) * np.arctan2(y - cy, x - cx) + rng.uniform(0, 2 * np.pi)) > 0
    dark, light = rng.randint(10, 90), rng.randint(170, 250)
    img = np.where(m, light, dark)[..., None] + rng.normal(0, 12, (size, size, 1))  # (size, size, 1)
    return Image.fromarray(np.repeat(img, 3, axis=2).clip(0, 255).astype(np.uint8))


class TexturesDataset(torch.utils.data.Dataset):
    """The embedded dataset: `per_class` images of each of the ten patterns, fixed by `split`."""

    def __init__(self, split="train", transform=None, per_class=None, size=64):
        per_class = per_class or PER_CLASS[split]
        rng = np.random.RandomState({"train": 0, "val": 1}[split])
        self.targets = [i % len(TEXTURES) for i in range(per_class * len(TEXTURES))]
        self.images = np.stack([np.asarray(draw_texture(rng, y, size)) for y in self.targets])  # (n, size, size, 3)
        self.classes, self.transform = list(TEXTURES), transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), self.targets[i]



_NOTED = set()  # what was said once per folder already


def _left_out(root):
    """("2 .heic, 1 .txt", "; convert ..."): the files under root that ImageFolder leaves out, by extension."""
    others = {}
    for _, _, files in os.walk(root, followlinks=True):
        for f in files:
            ext = os.path.splitext(f)[1].lower() or "no extension"
            if not f.startswith(".") and ext not in IMG_EXTENSIONS:
                others[ext] = others.get(ext, 0) + 1
    fix = "; convert the HEIC photos to JPEG to use them" if {".heic", ".heif"} & set(others) else ""
    return ", ".join(f"{n} {ext}" for ext, n in sorted(others.items(), key=lambda kv: -kv[1])), fix


class SafeImageFolder(ImageFolder):
    """torchvision's ImageFolder, read with open_image (or `loader`); an unreadable file is skipped with one
    warning naming it (a few corrupt files in a million should not end a run of days). With `flat`, a folder of
    images without class folders is one unlabelled set (DINO needs no labels); files that are not images it
    reads (an iPhone's .heic) are named once, by extension, as left out."""

    def __init__(self, root, transform=None, loader=None, side=None, flat=False):
        self.flat = flat  # before ImageFolder's constructor, which calls find_classes
        try:
            super().__init__(root, transform=transform, loader=loader or open_image)
        except (FileNotFoundError, RuntimeError) as e:
            found, fix = _left_out(root)
            found = f"; the files there are not images it can read ({found}){fix}" if found else ""
            raise DataError(f"no images in {root} ({e}); expected ROOT/class_name/image.jpg"
                            f"{' or ROOT/image.jpg' if flat else ''}{found}") from None
        if root not in _NOTED:  # once per folder: the k-NN evaluation builds its datasets again each time
            _NOTED.add(root)
            found, fix = _left_out(root)
            if found:
                print(f"note: files left out of {root} (not images it can read): {found}{fix}", file=sys.stderr)
        for path, _ in self.samples[:16]:  # unreadable data fails now, not later inside a loader worker
            try:
                open_image(path, side)  # `side`: a large JPEG is decoded at reduced size
                return
            except DataError as e:
                last = e
        raise DataError(f"the first images in {root} are all unreadable (the last: {last}); check the data")

    def find_classes(self, directory):
        if self.flat and not any(e.is_dir() for e in os.scandir(directory)):  # ROOT/image.jpg
            return [""], {"": 0}
        return super().find_classes(directory)

    def __getitem__(self, i):
        if i >= len(self):  # the end of a plain for loop; only the skipping below wraps around
            raise IndexError(i)
        for k in range(16):
            try:
                return super().__getitem__((i + k) % len(self))
            except (DataError, OSError) as e:  # OSError: a JPEG decoded by the transform
                warnings.warn(f"skipping {e}")
                last = e
        raise DataError(f"16 unreadable images in a row near index {i} in {self.root} (the last: {last}); "
                        f"check the data")


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


def has_val(data_path):
    """Whether k-NN evaluation can run: a built-in dataset, or a folder with train/ and val/."""
    return data_path in BUILTIN or (Path(data_path) / "val").is_dir() and (Path(data_path) / "train").is_dir()


def build_dataset(data_path, split, transform=None, download_dir=None, loader=None, shrink=None):
    """split: 'pretrain' (what DINO trains on), 'train' or 'val' (the k-NN memory bank and queries).
    loader: what an ImageFolder hands the transform (an RGB PIL image by default, or images.path_if_jpeg);
    the built-in datasets always give PIL images. shrink: a side (images.shrink_side) below which nothing is
    lost; when a folder's images are much larger (images.shrunk_bytes), they are decoded once, shrunk to it,
    and kept in memory (images.ShrunkImages), up to images.KEEP_BYTES."""
    if data_path in BUILTIN:
        if data_path == "textures":
            return TexturesDataset("val" if split == "val" else "train", transform)
        if data_path == "scenes":  # objects on clutter, with masks: scenes.py
            import scenes
            return scenes.ScenesDataset("val" if split == "val" else "train", transform)
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
    dataset = SafeImageFolder(str(root), transform, loader, shrink, flat=split == "pretrain")
    paths = [p for p, _ in dataset.samples]
    per_image = shrunk_bytes(paths, shrink) if shrink else None
    what = f"{'training' if split == 'pretrain' else split} images"
    if per_image and per_image * len(paths) <= KEEP_BYTES:
        dataset.loader = ShrunkImages(paths, shrink, what)
    elif per_image:  # too many to keep: each read decodes at reduced size (the training crops do so anyway)
        if (root, "large") not in _NOTED:
            _NOTED.add((root, "large"))
            print(f"note: {len(paths)} {what} are far larger than needed at this resolution, and too many to keep "
                  f"in memory once shrunk ({per_image * len(paths) / 2 ** 30:.1f} GiB): each read decodes them at "
                  f"reduced size", file=sys.stderr)
        if loader is None:
            dataset.loader = functools.partial(open_image, side=shrink)
    return dataset


if __name__ == "__main__":
    import argparse

    from makers import MAKERS
    parser = argparse.ArgumentParser(description="draw the embedded textures and scenes, or build a small ImageFolder")
    parser.add_argument("--make", nargs=2, metavar=("NAME", "DIR"), help=f"NAME: one of {', '.join(MAKERS)}")
    cli = parser.parse_args()
    if cli.make:
        name, out = cli.make
        problem = None
        if name not in MAKERS:
            problem = f"unknown dataset {name}; choose from {', '.join(MAKERS)}"
        elif Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
            problem = f"{out} exists and is not an empty directory; choose a new directory"
        if problem:  # one line and exit code 2, as the other command lines
            print(f"error: {problem}", file=sys.stderr)
            raise SystemExit(2)
        MAKERS[name](out)
        n = {split: sum(1 for _ in (Path(out) / split).rglob("*.*")) for split in ("train", "val")}
        print(f"{name}: {n['train']} training and {n['val']} validation images in {out}")
        raise SystemExit(0)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = TexturesDataset("val", per_class=4)
    fig, axes = plt.subplots(4, 10, figsize=(12, 5))
    for ax, i in zip(axes.flat, range(len(ds))):
        img, y = ds[i]
        ax.imshow(img), ax.axis("off")
    for ax, name in zip(axes[0], TEXTURES):
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig("textures.png", dpi=80)
    print(f"saved textures.png ({len(ds)} images)")

    import scenes  # the objects of Sec. 4.2.2: each scene above its mask, then a video's frames
    ds = scenes.ScenesDataset("val", per_class=1)
    video = scenes.video_sequences("val", n=1)[0]
    fig, axes = plt.subplots(3, 8, figsize=(12, 4.8))
    for i in range(8):
        axes[0, i].imshow(ds.images[i]), axes[0, i].set_title(scenes.CLASSES[ds.targets[i]], fontsize=9)
        axes[1, i].imshow(ds.masks[i], cmap="gray")
        axes[2, i].imshow(video[1][int(i * (len(video[1]) - 1) / 7)])
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig("scenes.png", dpi=80)
    print(f"saved scenes.png ({len(ds)} scenes with their masks, and a video's frames)")
