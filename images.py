"""Reading image files robustly, for the datasets of data.py and the evaluation scripts.

open_image decodes a file now, in full: turned as its EXIF orientation says, deeper images scaled to 8 bits, and
anything unreadable raised as one DataError naming the file and the fix. Files far larger than their crops need
(phone photos for 32 px crops) are decoded once at reduced size, shrunk and kept in memory (ShrunkImages), or,
when too many to keep, decoded at reduced size at each read.
"""
import functools
import math
import os
import sys

import numpy as np
from PIL import Image, ImageOps

ORIENTATION = 0x0112  # the EXIF tag


class DataError(Exception):
    """Bad data input: the message names the problem and the fix."""


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
    crops allow (a truncated one fails there, as an OSError); any other file goes through open_image, as in the
    evaluations. A JPEG is known by its first bytes, not its name: a 16-bit PNG named .jpg must not reach PIL's
    plain RGB conversion, which turns it white."""
    try:
        with open(path, "rb") as f:
            jpeg = f.read(3) == b"\xff\xd8\xff"
    except OSError:
        jpeg = False  # open_image names the problem
    return path if jpeg else open_image(path)


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
    again every epoch and every evaluation (a large JPEG costs more to decode, even at 1/8 scale, than a
    course step spends on an image). Decoded in parallel, one process per core; files that fail are kept as
    their DataError and raised when read, so that data.SafeImageFolder skips them. The images are shared
    between the datasets of one process (the k-NN train split is the training set)."""

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
