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


def pattern_mask(name, x, y, u, v, p, cx, cy, rng):
    """The binary pattern m(x, y) of kind `name` on the pixel grid x, y (rotated u, v), at period p in pixels,
    rings and rays centred on (cx, cy): the textures' classes, and the surfaces of the scenes' objects."""
    if name == "hstripes":
        return np.sin(2 * np.pi * v / p) > 0
    if name in ("vstripes", "stripes"):
        return np.sin(2 * np.pi * u / p) > 0
    if name in ("checker", "checks"):
        return np.sin(2 * np.pi * u / p) * np.sin(2 * np.pi * v / p) > 0
    if name == "dots":
        return np.sin(np.pi * u / p) ** 2 + np.sin(np.pi * v / p) ** 2 < 0.6
    if name == "rings":
        return np.sin(2 * np.pi * np.hypot(x - cx, y - cy) / p) > 0
    if name == "grid":
        return (np.abs(np.sin(np.pi * u / p)) < 0.3) | (np.abs(np.sin(np.pi * v / p)) < 0.3)
    if name == "diagonals":
        return (np.abs(np.sin(np.pi * (u + v) / p / 1.4)) < 0.3) | (np.abs(np.sin(np.pi * (u - v) / p / 1.4)) < 0.3)
    if name == "blobs":  # smooth noise, thresholded at its median
        size = x.shape[0]
        n = rng.normal(size=(size // 8 + 2, size // 8 + 2))
        n = Image.fromarray(((n - n.min()) / np.ptp(n) * 255).astype(np.uint8))
        n = np.asarray(n.resize((size + 16, size + 16), Image.BICUBIC), dtype=np.float64)[8:-8, 8:-8]
        return n > np.median(n)
    if name == "waves":
        return np.sin(2 * np.pi * (v + 0.25 * p * np.sin(2 * np.pi * u / (2.5 * p))) / p) > 0
    if name == "rays":
        return np.sin(rng.randint(5, 9) * np.arctan2(y - cy, x - cx) + rng.uniform(0, 2 * np.pi)) > 0
    if name == "zigzag":
        return np.sin(2 * np.pi * (v + 0.5 * p * np.abs(((u / p) % 2) - 1)) / p) > 0
    raise ValueError(f"unknown pattern {name!r}")


def draw_texture(rng, label, size=64):
    """One image of class `label`: a binary pattern m(x, y) painted light on dark, plus noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    tilt = rng.uniform(-0.25, 0.25)  # radians: small, so horizontal and vertical stay apart
    u, v = x * math.cos(tilt) - y * math.sin(tilt), x * math.sin(tilt) + y * math.cos(tilt)
    p = rng.uniform(7, 14)  # period in pixels
    u, v = u + rng.uniform(0, p), v + rng.uniform(0, p)  # phase
    cx, cy = rng.uniform(0, size, 2)  # centre of rings and rays
    m = pattern_mask(TEXTURES[label], x, y, u, v, p, cx, cy, rng)
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



_NOTED = set()  # the notes given already: the k-NN evaluation builds its datasets again each time


def _note(message):
    if message not in _NOTED:
        _NOTED.add(message)
        print(f"note: {message}", file=sys.stderr)


def scan(top):
    """The regular files under `top`, in the order of sorted(os.walk(top, followlinks=True)), and what was left
    out, as "path (why)". Unlike os.walk: each real folder is read once, so that a link back up (`ln -s . loop`)
    or to a folder read already is cut, not followed again and again (its images counted once per turn); hidden
    files and folders are left out, as file browsers do (.ipynb_checkpoints, macOS's ._IMG.jpg); and so are
    FIFOs, devices and broken links (opening a FIFO named like an image waits forever)."""
    seen, found, cut = set(), [], []

    def visit(folder):
        here = os.path.realpath(folder)
        seen.add(here)
        files = []
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:  # an unreadable folder
            cut.append(f"{folder} ({e.strerror or e})")
            return
        for e in entries:
            path = os.path.join(folder, e.name)
            if e.name.startswith("."):
                continue
            if e.is_dir():
                target = os.path.realpath(path)
                if os.path.commonpath([target, here]) == target:  # the folder itself or one above it
                    cut.append(f"{path} (a link back to {target}: a loop)")
                elif target in seen:
                    cut.append(f"{path} (a link to {target}, read already)")
                else:
                    visit(path)
            elif e.is_file():
                files.append(path)
            else:
                cut.append(f"{path} ({'a broken link' if e.is_symlink() else 'not a regular file'})")
        found.append((folder, files))

    visit(str(top))
    return [f for _, files in sorted(found) for f in files], cut


def _left_out(files):
    """("2 .heic, 1 .txt", "; convert ..."): the files that ImageFolder leaves out, by extension."""
    others = {}
    for f in files:
        ext = os.path.splitext(f)[1].lower() or "no extension"
        if ext not in IMG_EXTENSIONS:
            others[ext] = others.get(ext, 0) + 1
    fix = "; convert the HEIC photos to JPEG to use them" if {".heic", ".heif"} & set(others) else ""
    return ", ".join(f"{n} {ext}" for ext, n in sorted(others.items(), key=lambda kv: -kv[1])), fix


def _show(items, n=4):
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


class SafeImageFolder(ImageFolder):
    """torchvision's ImageFolder, read with open_image (or `loader`); an unreadable file is skipped with one
    warning naming it (a few corrupt files in a million should not end a run of days). Folders are read with
    `scan`: links followed once, hidden folders and special files left out, and named. With `flat`, a folder
    holding images (beside subfolders or not) is one unlabelled set of all the images under it (DINO needs no
    labels); files that are not images it reads (an iPhone's .heic) are named once, by extension, as left out."""

    def __init__(self, root, transform=None, loader=None, side=None, flat=False):
        self.flat, self.beside = flat, []  # before ImageFolder's constructor, which calls find_classes
        self.files, self.cut = None, []  # what make_dataset found under root
        try:
            super().__init__(root, transform=transform, loader=loader or open_image)
        except (FileNotFoundError, RuntimeError) as e:
            found, fix = _left_out(self.files if self.files is not None else scan(root)[0])
            found = f"; the files there are not images it can read ({found}){fix}" if found else ""
            raise DataError(f"no images in {root} ({e}); expected ROOT/class_name/image.jpg"
                            f"{' or ROOT/image.jpg' if flat else ''}{found}") from None
        found, fix = _left_out(self.files)
        if found:
            _note(f"files left out of {root} (not images it can read): {found}{fix}")
        if self.cut:
            _note(f"left out of {root}: {_show(self.cut)}")
        if self.beside:
            _note(f"{root} holds images beside its folders ({_show(self.beside)}): all {len(self)} images under it "
                  f"are one training set")
        for path, _ in self.samples[:16]:  # unreadable data fails now, not later inside a loader worker
            try:
                open_image(path, side)  # `side`: a large JPEG is decoded at reduced size
                return
            except DataError as e:
                last = e
        raise DataError(f"the first images in {root} are all unreadable (the last: {last}); check the data")

    def find_classes(self, directory):
        entries = [e for e in os.scandir(directory) if not e.name.startswith(".")]
        folders = sorted(e.name for e in entries if e.is_dir())
        if self.flat and (not folders or any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)
                                             for e in entries)):  # ROOT/image.jpg
            self.beside = folders
            return [""], {"": 0}
        if not folders:
            raise FileNotFoundError(f"no class folders in {directory}")
        return folders, {c: i for i, c in enumerate(folders)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """(path, class index) of every image under `directory`, class folder by class folder, read by `scan`."""
        self.files, self.cut = scan(directory)
        samples = []
        for path in self.files:
            c = "" if "" in class_to_idx else os.path.relpath(path, directory).split(os.sep)[0]
            if c in class_to_idx and path.lower().endswith(IMG_EXTENSIONS):
                samples.append((path, class_to_idx[c]))
        samples.sort(key=lambda s: s[1])  # stable: by class, then as sorted(os.walk), torchvision's order
        empty = [c for c, i in class_to_idx.items() if i not in {i for _, i in samples}]
        if empty:
            raise FileNotFoundError(f"no image files in the class folders {_show(empty)}" if empty != [""] else
                                    "no image files")
        return samples

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
        raise DataError(f"{data_path} has no val/ folder; the evaluations need ROOT/train and ROOT/val, with a "
                        f"folder per class in each")
    dataset = SafeImageFolder(str(root), transform, loader, shrink, flat=split == "pretrain")
    paths = [p for p, _ in dataset.samples]
    per_image = shrunk_bytes(paths, shrink) if shrink else None
    what = f"{'training' if split == 'pretrain' else split} images"
    if per_image and per_image * len(paths) <= KEEP_BYTES:
        dataset.loader = ShrunkImages(paths, shrink, what)
    elif per_image:  # too many to keep: each read decodes at reduced size (the training crops do so anyway)
        _note(f"{len(paths)} {what} are far larger than needed at this resolution, and too many to keep in memory "
              f"once shrunk ({per_image * len(paths) / 2 ** 30:.1f} GiB): each read decodes them at reduced size")
        if loader is None:
            dataset.loader = functools.partial(open_image, side=shrink)
    return dataset


if __name__ == "__main__":
    import cli
    from makers import MAKERS, make
    parser = cli.Parser(description="draw the embedded textures and scenes, or build a small ImageFolder")
    parser.add_argument("--make", nargs=2, metavar=("NAME", "DIR"), help=f"NAME: one of {', '.join(MAKERS)}")
    args = parser.parse_args()
    if args.make:  # errors: one line and exit code 2, as the other command lines
        sys.exit(cli.run(lambda a: make(*a.make), lambda _: args))
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
