"""Datasets for train.py and 06_knn.py: an ImageFolder directory, or a built-in name.

`textures` (the default) is generated here, needs no download and is the same on every machine:
ten pattern classes (stripes, checkers, dots, rings, ...) drawn in gray levels at a random period,
phase, slight tilt, brightness and contrast, with pixel noise. Every crop of an image, global or
local, shows its class, and what changes between images of a class is what DINO's augmentations
teach a network to ignore: scale and position (resized crops), brightness and contrast (colour
jitter). Its limits: raw pixels classify it well (a k-NN on them reaches 81 %), and a ViT needs
colour variation within that of colour jitter: with fully random colours, the short runs of the
course learned colour instead of pattern.

Also here: the training loader (items seeded per (seed, epoch, image), batches finished on the training
device) and MAKERS, datasets written to a folder offline: `python data.py --make jpegs DIR` builds an
ImageNet-like folder of JPEGs for timing the input pipeline.
"""
import functools
import itertools
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

BUILTIN = ("textures", "scenes", "cifar10", "cifar100", "stl10")
TEXTURES = ("hstripes", "vstripes", "checker", "dots", "rings", "grid", "diagonals", "blobs", "waves", "rays")
PER_CLASS = {"train": 500, "val": 100}  # images of each pattern in the embedded splits
CACHE = Path(os.environ.get("DINO_DATA", Path.home() / ".cache" / "dino-data"))


ORIENTATION = 0x0112  # the EXIF tag


class DataError(Exception):
    """Bad data input: the message names the problem and the fix."""


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


def open_image(path, side=None):
    """An image file as 8-bit RGB, decoded now, turned as its EXIF orientation says (as photo viewers show it): a
    truncated or corrupt file fails here, as a DataError naming it.
    Deeper images keep their real values: 16-bit integers (PNG, TIFF) are divided by 257 (65535 -> 255);
    floats (TIFF) in [0, 1] are multiplied by 255, and floats outside [0, 1] are refused, since no one scaling
    of them is right for every image (PIL's own convert("RGB") clips both kinds to 0 or 255).
    With `side`, an image whose shorter side is longer is shrunk to it (antialiased bicubic; a JPEG is first
    decoded at 1/2, 1/4 or 1/8 of its size where that keeps `side`: PIL's draft, DCT scaling)."""
    try:  # bytes from anywhere can raise anything inside PIL, not only OSError
        img = Image.open(path)
        if side and min(img.size) > side:  # a no-op for formats other than JPEG
            img.draft("RGB", tuple(math.ceil(n * side / min(img.size)) for n in img.size))
        img.load()  # closes the file
        if img.getexif().get(ORIENTATION, 1) != 1:  # a phone's photo stored sideways: turned as it is shown
            img = ImageOps.exif_transpose(img)
    except Exception as e:
        reason = (str(e).splitlines() or ["no message"])[0][:200]
        raise DataError(f"unreadable image {path} ({type(e).__name__}: {reason}); re-save or remove it") from None
    if img.mode.startswith("I"):  # "I;16", "I;16B", ... and "I" (32-bit integers)
        a = np.asarray(img, dtype=np.float64)
        if a.min() < 0 or a.max() > 65535:
            raise DataError(f"unreadable image {path} (integer values in [{a.min():g}, {a.max():g}], beyond 16 "
                            f"bits); save it with 8 or 16 bits")
        img = Image.fromarray((a / 257).round().astype(np.uint8))
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if not (np.isfinite(a).all() and 0 <= a.min() and a.max() <= 1):
            raise DataError(f"unreadable image {path} (float values in [{a.min():g}, {a.max():g}], outside "
                            f"[0, 1]); rescale it to [0, 1] or save it with 8 or 16 bits")
        img = Image.fromarray((a * 255).round().astype(np.uint8))
    img, (w, h) = img.convert("RGB"), img.size
    if side and min(w, h) > side:
        img = img.resize((max(1, round(w * side / min(w, h))), max(1, round(h * side / min(w, h)))), Image.BICUBIC)
    return img


def path_if_jpeg(path):
    """The split multi-crop's loader: a JPEG stays a path, which the transform decodes at reduced size when its
    crops allow (a truncated one fails there, as an OSError); any other file goes through open_image."""
    return path if str(path).lower().endswith((".jpg", ".jpeg")) else open_image(path)


_NOTED = set()  # what was said once per folder already


class SafeImageFolder:
    """torchvision's ImageFolder, read with open_image (or `loader`); an unreadable file is skipped with one
    warning naming it (a few corrupt files in a million should not end a run of days). With `flat`, a folder of
    images without class folders is one unlabelled set (DINO needs no labels); files that are not images it
    reads (an iPhone's .heic) are named once, by extension, as left out."""

    def __new__(cls, root, transform=None, loader=None, side=None, flat=False):
        from torchvision.datasets import ImageFolder
        from torchvision.datasets.folder import IMG_EXTENSIONS

        class _Safe(ImageFolder):
            def find_classes(self, directory):
                if flat and not any(e.is_dir() for e in os.scandir(directory)):  # ROOT/image.jpg
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
                raise DataError(f"16 unreadable images in a row near index {i} in {root} (the last: {last}); "
                                f"check the data")

        def left_out():  # ("2 .heic, 1 .txt", "; convert ..."): the files that ImageFolder leaves out, by extension
            others = {}
            for _, _, files in os.walk(root, followlinks=True):
                for f in files:
                    ext = os.path.splitext(f)[1].lower() or "no extension"
                    if not f.startswith(".") and ext not in IMG_EXTENSIONS:
                        others[ext] = others.get(ext, 0) + 1
            fix = "; convert the HEIC photos to JPEG to use them" if {".heic", ".heif"} & set(others) else ""
            return ", ".join(f"{n} {ext}" for ext, n in sorted(others.items(), key=lambda kv: -kv[1])), fix

        try:
            dataset = _Safe(root, transform=transform, loader=loader or open_image)
        except (FileNotFoundError, RuntimeError) as e:
            found, fix = left_out()
            found = f"; the files there are not images it can read ({found}){fix}" if found else ""
            raise DataError(f"no images in {root} ({e}); expected ROOT/class_name/image.jpg"
                            f"{' or ROOT/image.jpg' if flat else ''}{found}") from None
        if root not in _NOTED:  # once per folder: the k-NN evaluation builds its datasets again each time
            _NOTED.add(root)
            found, fix = left_out()
            if found:
                print(f"note: files left out of {root} (not images it can read): {found}{fix}", file=sys.stderr)
        for path, _ in dataset.samples[:16]:  # unreadable data fails now, not later inside a loader worker
            try:
                open_image(path, side)  # `side`: a large JPEG is decoded at reduced size
                return dataset
            except DataError as e:
                last = e
        raise DataError(f"the first images in {root} are all unreadable (the last: {last}); check the data")


# ---------------------------------------------------------------------------- large files, small crops
def shrink_side(outputs):
    """The shorter side (px) from which every output is resampled from at least twice its pixels per side:
    outputs are (size, smallest area fraction) of random resized crops (aspect ratios 3:4 to 4:3, so the
    box's shorter side is at least sqrt(3/4 area) of the image's), or (size, None) for a resize of the
    whole image's shorter side to `size` (evaluation). An image larger than that loses nothing visible by
    being shrunk to it first."""
    return math.ceil(max(2 * size / (math.sqrt(0.75 * area) if area else 1) for size, area in outputs))


class ShrunkImages:
    """An ImageFolder's loader for images much larger than their crops need (phone photos for 32 px crops):
    each file is decoded once, shrunk to `side` (open_image), and kept in memory, instead of being decoded
    again every epoch and every evaluation (a 12-megapixel JPEG costs 15-35 ms even at 1/8 scale, four to
    eight times a course step's share of an image on a CPU). Decoded in parallel, one process per core; files
    that fail are kept as their DataError and raised when read, so that SafeImageFolder skips them. The
    images are shared between the datasets of one process (the k-NN train split is the training set)."""

    _memory = {}  # (path, side) -> PIL image or DataError

    def __init__(self, paths, side, what="images"):
        todo = [p for p in paths if (p, side) not in self._memory]
        if todo:
            from concurrent.futures import ProcessPoolExecutor
            from tqdm import tqdm
            with ProcessPoolExecutor(min(os.cpu_count() or 1, 8)) as pool:
                done = pool.map(functools.partial(_open_or_error, side=side), todo, chunksize=8)
                for p, img in zip(todo, tqdm(done, total=len(todo), desc=f"decoding {what}", leave=False)):
                    self._memory[(p, side)] = img
            mb = sum(3 * i.width * i.height for i in map(self._memory.get, ((p, side) for p in todo))
                     if isinstance(i, Image.Image)) / 2 ** 20
            print(f"note: {len(todo)} {what} are far larger than needed at this resolution: decoded once, shrunk "
                  f"to {side} px (shorter side) and kept in memory ({mb:.0f} MiB)", file=sys.stderr)
        self.images = {p: self._memory[(p, side)] for p in paths}  # its own: pickled to spawned workers

    def __call__(self, path):
        img = self.images[path]
        if isinstance(img, DataError):
            raise DataError(str(img))  # a new one each time: a raised exception keeps its traceback
        return img


def _open_or_error(path, side):
    try:
        return open_image(path, side)
    except DataError as e:
        return e


def shrunk_bytes(paths, side, sample=32):
    """If a folder's images are much larger than `side` (the median shorter side of up to `sample` files,
    evenly spaced, read from their headers, is above twice it): their mean size in memory once shrunk to
    it, in bytes. Else None."""
    sizes = []
    for p in paths[::max(1, len(paths) // sample)][:sample]:
        try:
            with Image.open(p) as img:
                sizes.append(img.size)
        except Exception:  # unreadable files are reported where they are read
            pass
    if not sizes or float(np.median([min(s) for s in sizes])) <= 2 * side:
        return None
    return float(np.mean([3 * w * h * min(1.0, side / min(w, h)) ** 2 for w, h in sizes]))


KEEP_BYTES = 2 * 2 ** 30  # at most this much memory for shrunk images: 39,000 phone photos at 117 px


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
    loader: what an ImageFolder hands the transform (an RGB PIL image by default, or path_if_jpeg); the
    built-in datasets always give PIL images. shrink: a side (shrink_side) below which nothing is lost;
    when a folder's images are much larger (shrunk_bytes), they are decoded once, shrunk to it, and kept
    in memory (ShrunkImages), up to KEEP_BYTES."""
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


# ---------------------------------------------------------------------------- small real datasets
# Real images that ship inside installed packages, made into ImageFolders (ROOT/train, ROOT/val) with
# `python data.py --make NAME DIR`: a benchmark of the kind of folder a course points train.py at. The
# same files and seed give the same folder on every machine. scikit-image and scikit-learn are needed
# here only, never for training.
def _skimage(name):
    import skimage.io
    path = Path(__import__("skimage").__file__).parent / "data" / name
    return Image.fromarray(skimage.io.imread(path))


def _photos():
    """Eleven colour photographs: people, animals, objects, scenes, a microscope slide, a retina, the sky."""
    import matplotlib
    import sklearn
    sk = [_skimage(f) for f in ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                                 "motorcycle_left.png", "retina.jpg", "rocket.jpg")]
    other = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"] + \
            [Path(sklearn.__file__).parent / "datasets" / "images" / f for f in ("china.jpg", "flower.jpg")]
    names = ["astronaut", "cat", "coffee", "galaxies", "tissue", "motorcycle", "retina", "rocket", "portrait",
             "temple", "flower"]
    return dict(zip(names, sk + [Image.open(p) for p in other]))


def _gray_surfaces():
    """Seven gray images of surfaces and materials: brick, grass, gravel, the moon, cells, coins, printed text."""
    files = ("brick.png", "grass.png", "gravel.png", "moon.png", "cell.png", "coins.png", "page.png")
    return {f.split(".")[0]: _skimage(f) for f in files}


def _write_crops(sources, out, per_class, side_range, ext, seed=0):
    """per_class random square crops of each source image (side a random fraction of its shorter side),
    saved at their own size; one class per source; every fifth crop goes to val/."""
    rng = np.random.RandomState(seed)
    for label, img in sources.items():
        img = img.convert("RGB") if img.mode not in ("L", "RGB") else img
        w, h = img.size
        for i in range(per_class):
            side = int(min(w, h) * rng.uniform(*side_range))
            x, y = rng.randint(0, w - side + 1), rng.randint(0, h - side + 1)
            d = Path(out) / ("val" if i % 5 == 4 else "train") / label
            d.mkdir(parents=True, exist_ok=True)
            img.crop((x, y, x + side, y + side)).save(d / f"{i:04d}.{ext}", **({"quality": 90} if ext == "jpg" else {}))


def make_digits(out):
    """1,797 handwritten digits, 8 x 8 px, 17 gray levels (scikit-learn's copy of the UCI set), 10 classes."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    for i, (x, y) in enumerate(zip(digits.images, digits.target)):
        d = Path(out) / ("val" if i % 5 == 4 else "train") / str(y)
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x * 255 / 16).round().astype(np.uint8)).save(d / f"{i:04d}.png")



# ---------------------------------------------------------------------------- training loader
class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler whose indices also carry the epoch (epoch * n + i), so that each sample's
    crops are drawn from a generator seeded by (seed, epoch, index): the same crops whatever the
    number of workers, and a resumed run sees exactly what an uninterrupted one would."""

    skip = 0  # indices of this epoch already consumed before a resume

    def __iter__(self):
        n = len(self.dataset)
        return (self.epoch * n + i for i in itertools.islice(super().__iter__(), self.skip, None))


class SeededCrops(torch.utils.data.Dataset):
    """Item `key` = epoch * n + i: image i through the transform, with torch's generator seeded by (seed,
    epoch, i). Returns (crops, params, target, cpu): params are the photometric draws of the split recipe
    (01_multicrop.DataAugmentationDINOSplit; {} for DataAugmentationDINO, which returns finished crops),
    cpu the seconds of CPU this item took in its process (measured, for --benchmark_data)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        t0 = time.process_time()
        epoch, i = divmod(key, len(self.dataset))
        with torch.random.fork_rng(devices=[]):  # leave the caller's generator as it was
            # a tuple of ints hashes the same every run; the CPU generator only (torch.manual_seed would also
            # seed CUDA's, lazily)
            torch.default_generator.manual_seed(hash((self.seed, epoch, i)) % 2 ** 62)
            sample, target = self.dataset[i]
        crops, params = sample if isinstance(sample, tuple) else (sample, {})
        return crops, params, target, time.process_time() - t0


class CollateCrops:
    """Batches of SeededCrops items, made in the worker. With `augment` (a CPU-only run, where the training
    device is the CPU) the batched photometric half runs here too, beside the training process, not in it."""

    def __init__(self, augment=None):
        self.augment = augment

    def __call__(self, items):
        crops, params, targets, cpu = torch.utils.data.default_collate(items)  # crops: V tensors (B, 3, h, w)
        batched, t0 = 0.0, time.process_time()
        if params and self.augment is not None:
            crops, params = self.augment(crops, params), {}
            batched = time.process_time() - t0
        return crops, params, targets, (float(cpu.sum()), batched)  # CPU seconds: per image, batched


class DeviceBatches:
    """The training loader as the loop sees it: (crops, targets) with the crops finished and on `device`;
    uint8 crops still carrying their photometric draws are augmented there, batched. Counts the images of
    the batches it handed out and the CPU seconds the workers spent on them: per image (decode, crops, and
    the whole recipe in reference mode) and batched (the photometric half, when it runs in the workers)."""

    def __init__(self, loader, device, augment):
        self.loader, self.sampler, self.device, self.augment = loader, loader.sampler, device, augment
        self.images, self.cpu_seconds, self.cpu_seconds_batched = 0, 0.0, 0.0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for crops, params, targets, cpu in self.loader:
            self.images += len(targets)
            self.cpu_seconds += cpu[0]
            self.cpu_seconds_batched += cpu[1]
            crops = [c.to(self.device, non_blocking=True) for c in crops]
            yield (self.augment(crops, params) if params else crops), targets


# Ctrl-C reaches every process of the terminal, and SIGTERM / SIGUSR1 every process of the group (SLURM's scancel,
# preemption and --signal ahead of a time limit; systemd; timeout). The main process finishes its step and saves.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


def ignore_stop_signals(_):
    """In each loader worker: leave the stop signals to the main process (a worker killed by one would end the
    run without its checkpoint)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def training_loader(dataset, batch_size, num_workers, seed, rank=0, world=1, device=torch.device("cpu"),
                    augment=None):
    """Shuffled full batches of multi-crop samples, seeded per (seed, epoch, image), finished on `device`;
    set_epoch and skip go through `loader.sampler`. augment: the batched photometric half for samples of
    the split recipe; it runs in the workers when the device is the CPU, on the device otherwise."""
    sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    on_cpu = device.type == "cpu"
    loader = torch.utils.data.DataLoader(
        SeededCrops(dataset, seed), sampler=sampler, batch_size=batch_size, num_workers=num_workers,
        collate_fn=CollateCrops(augment if on_cpu else None), pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None,
        worker_init_fn=ignore_stop_signals)
    return DeviceBatches(loader, device, augment)


# ---------------------------------------------------------------------------- folders of JPEGs, built offline
def _sample_photographs():
    """Colour photographs that ship inside installed packages (no download): scikit-image's data
    module, scikit-learn's sample images and matplotlib's sample data. One class per photograph."""
    import matplotlib
    import skimage
    import sklearn
    skimage_dir = Path(skimage.__file__).parent / "data"
    sklearn_dir = Path(sklearn.__file__).parent / "datasets" / "images"
    mpl_dir = Path(matplotlib.get_data_path()) / "sample_data"
    return {"astronaut": skimage_dir / "astronaut.png", "cat": skimage_dir / "chelsea.png",
            "coffee": skimage_dir / "coffee.png", "motorcycle": skimage_dir / "motorcycle_left.png",
            "rocket": skimage_dir / "rocket.jpg", "galaxies": skimage_dir / "hubble_deep_field.jpg",
            "retina": skimage_dir / "retina.jpg", "flower": sklearn_dir / "flower.jpg",
            "temple": sklearn_dir / "china.jpg", "portrait": mpl_dir / "grace_hopper.jpg"}


def make_jpegs(out_dir, per_class={"train": 30, "val": 10}, size=(500, 375), quality=90, seed=0):
    """An ImageNet-like ImageFolder, OUT/{train,val}/<photograph>/NNN.jpg: 400 JPEGs of 500 x 375
    (a quarter of them 375 x 500, portrait) at quality 90, each a random crop (25-100 % of the area,
    the output's aspect ratio), possibly mirrored, of one of ten photographs. ImageNet's typical file
    size and compression, so decoding and cropping cost what they cost there; the same bytes on every
    run (given the same Pillow). Few classes of one photograph each: for timing the input pipeline,
    not for judging features."""
    rng = np.random.RandomState(seed)
    out_dir = Path(out_dir)
    for name, path in _sample_photographs().items():
        photo = Image.open(path).convert("RGB")
        W, H = photo.size
        for split, n in per_class.items():
            (out_dir / split / name).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                w, h = size if rng.rand() >= 0.25 else size[::-1]
                area = rng.uniform(0.25, 1.0) * W * H
                cw = min(W, round(math.sqrt(area * w / h)))  # a crop of the output's aspect ratio
                ch = min(H, round(cw * h / w))
                cw = min(cw, round(ch * w / h))
                x0, y0 = rng.randint(0, W - cw + 1), rng.randint(0, H - ch + 1)
                img = photo.resize((w, h), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
                if rng.rand() < 0.5:
                    img = img.transpose(Image.FLIP_LEFT_RIGHT)
                img.save(out_dir / split / name / f"{k:03d}.jpg", quality=quality)
    return out_dir


MAKERS = {
    "digits": make_digits,
    "photos": lambda out: _write_crops(_photos(), out, 400, (0.15, 0.45), "jpg"),  # 4,400 colour crops
    "surfaces": lambda out: _write_crops(_gray_surfaces(), out, 400, (0.1, 0.3), "png"),  # 2,800 gray crops
    "jpegs": make_jpegs,  # 400 ImageNet-size JPEGs, for timing the input pipeline
}


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="draw the embedded textures, or build a small real ImageFolder")
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
