"""`scenes`: the embedded data for the emerging properties (paper Sec. 4.2.2), with ground-truth masks.

Each image is one object on clutter. The object's class is what it is: its outline (disk, square, triangle,
...) and its surface (stripes, checks, dots, ...: the class's pattern, as fur or feathers mark an animal), at a
random position, scale and angle, the pattern at a random period and phase. The background is "dead leaves":
many small flat discs and boxes, out of focus as behind a photographed object. Everything is gray, in levels drawn from one range. So:

- no pixel tells object from background: both take their gray levels from the same distribution;
- the background says nothing about the class: it is drawn independently of it; nor about which scene it is:
  hundreds of small leaves make it one texture everywhere, so two crops of a scene share only the object;
- the class is in the object only, in its outline and in the arrangement of its pixels.

Every image comes with its object mask (the pixels more than half covered by the object). Videos are short
sequences of such scenes in which the object moves, turns and changes scale while the clutter pans slowly
beneath it; each frame has its mask.

Everything is generated from fixed seeds, the same on every machine, with nothing downloaded:
`data.build_dataset("scenes", split)` gives the images (PIL image, class), `ScenesDataset(split).masks` their
masks, `video_sequences(split)` the videos, and `write_folders(DIR)` all of it as files other tools read
(ImageFolder train/ and val/, the val split laid out as PASCAL VOC, the videos as DAVIS-2017).
"""
import functools
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

import data

CLASSES = ("disk", "square", "triangle", "cross", "ring", "star", "crescent", "bar")
PATTERNS = ("stripes", "checks", "dots", "rings", "grid", "waves", "rays", "zigzag")  # class i: shape i, pattern i
PER_CLASS = {"train": 500, "val": 50}
SIZE = 64  # pixels per side of an image
SEEDS = {"train": 10, "val": 11}
BLUR = 0.02  # the clutter is out of focus, as behind a photographed object: blur radius / side
# Many small leaves, so that the clutter is one texture in every scene: its statistics do not tell the scenes apart
# (few large leaves did: two crops of one scene shared their grays, and DINO learnt to describe the background)
LEAVES, LEAF_RADIUS = 600, (0.02, 0.06)  # radius / side
SUPERSAMPLE = 2  # drawn at twice the size, then averaged down: smooth edges, masks to the half pixel


def _palette(rng, n):
    """n random gray levels as RGB, shared by the object and the clutter. Gray, as `textures`: with colours
    beyond what colour jitter changes, the colours of two crops of one image match, and a short run learns to
    tell images apart by their colours instead of by what is in them."""
    return np.repeat(rng.randint(0, 256, (n, 1)), 3, axis=1)


def _shape_polygon(label, cx, cy, r, angle):
    """Outline(s) of class `label` centred at (cx, cy) with outer radius r, turned by `angle`: a list of
    (polygon, fill) pairs, fill False cutting a hole."""
    def turn(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    def circle(radius, n=48, dx=0.0):
        return [(dx + radius * math.cos(2 * math.pi * i / n), radius * math.sin(2 * math.pi * i / n)) for i in range(n)]

    name = CLASSES[label]
    if name == "disk":
        return [(turn(circle(r)), True)]
    if name == "square":
        a = r / math.sqrt(2)
        return [(turn([(-a, -a), (a, -a), (a, a), (-a, a)]), True)]
    if name == "triangle":
        return [(turn([(r * math.cos(t), r * math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]),
                 True)]
    if name == "cross":
        a, b = r, r * 0.33
        return [(turn([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b),
                       (-a, -b), (-b, -b)]), True)]
    if name == "ring":
        return [(turn(circle(r)), True), (turn(circle(r * 0.55)), False)]
    if name == "star":
        return [(turn([((r if i % 2 == 0 else r * 0.45) * math.cos(math.pi * i / 5 - math.pi / 2),
                        (r if i % 2 == 0 else r * 0.45) * math.sin(math.pi * i / 5 - math.pi / 2))
                       for i in range(10)]), True)]
    if name == "crescent":
        return [(turn(circle(r)), True), (turn(circle(r * 0.8, dx=r * 0.5)), False)]
    if name == "bar":
        a, b = r, r * 0.38
        return [(turn([(-a, -b), (a, -b), (a, b), (-a, b)]), True)]
    raise ValueError(label)


def _pattern(rng, label, colours, size):
    """The object's surface, the mark of its class as fur or feathers are of an animal's: a two-colour pattern of
    kind `label` at a random period and angle. (size, size, 3)"""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    t = rng.uniform(0, np.pi)
    u, v = x * math.cos(t) - y * math.sin(t), x * math.sin(t) + y * math.cos(t)
    p = rng.uniform(4.0, 7.0) * SUPERSAMPLE  # period in pixels of the drawing
    cx, cy = rng.uniform(0, size, 2)
    m = data.pattern_mask(PATTERNS[label], x, y, u, v, p, cx, cy, rng)
    return np.where(m[..., None], colours[0], colours[1])


def _two_levels(rng):
    """The pattern's two gray levels, from the clutter's range, at least a quarter of it apart: a pattern to see."""
    a = rng.randint(0, 256)
    b = (a + rng.randint(64, 193)) % 256
    return np.array([[a] * 3, [b] * 3])


def _clutter(rng, size, n=LEAVES):
    """Dead leaves: n flat-coloured discs and boxes, each much smaller than the object, painted in turn."""
    img = Image.new("RGB", (size, size), tuple(int(c) for c in _palette(rng, 1)[0]))
    draw = ImageDraw.Draw(img)
    for colour, (x, y), r, box in zip(_palette(rng, n), rng.uniform(-0.1, 1.1, (n, 2)) * size,
                                      rng.uniform(*LEAF_RADIUS, n) * size, rng.rand(n) < 0.5):
        (draw.rectangle if box else draw.ellipse)([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in colour))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(BLUR * size)))


def _object_alpha(label, cx, cy, r, angle, size):
    """The object's coverage on the drawing grid: 1 inside, 0 outside. (size, size) float"""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon, fill in _shape_polygon(label, cx, cy, r, angle):
        draw.polygon(polygon, fill=255 if fill else 0)
    return np.asarray(canvas, dtype=np.float64) / 255


def _compose(background, alpha, fill, size):
    """Object over background on the drawing grid, then averaged down to `size`: (PIL image, bool mask)."""
    big = background * (1 - alpha[..., None]) + fill * alpha[..., None]
    s = SUPERSAMPLE
    small = big.reshape(size, s, size, s, 3).mean(axis=(1, 3))
    cover = alpha.reshape(size, s, size, s).mean(axis=(1, 3))
    return Image.fromarray(small.round().clip(0, 255).astype(np.uint8)), cover > 0.5


def draw_scene(rng, label, size=SIZE):
    """One image of class `label` and its object mask: (PIL RGB image, (size, size) bool array)."""
    big = size * SUPERSAMPLE
    r = rng.uniform(0.25, 0.38) * big  # outer radius: a large object, a few patches wide
    cx, cy = rng.uniform(r * 0.8, big - r * 0.8, 2)  # mostly inside the frame
    angle = rng.uniform(0, 2 * math.pi)
    background = _clutter(rng, big)
    fill = _pattern(rng, label, _two_levels(rng), big)
    return _compose(background, _object_alpha(label, cx, cy, r, angle, big), fill, size)


@functools.lru_cache(maxsize=4)
def _generate(split, per_class, size):
    """(images (n, size, size, 3) uint8, masks (n, size, size) bool, classes), drawn once per process."""
    rng = np.random.RandomState(SEEDS[split])
    targets = [i % len(CLASSES) for i in range(per_class * len(CLASSES))]
    drawn = [draw_scene(rng, y, size) for y in targets]
    return np.stack([np.asarray(img) for img, _ in drawn]), np.stack([m for _, m in drawn]), targets


class ScenesDataset(torch.utils.data.Dataset):
    """The embedded scenes: `per_class` images of each class, fixed by `split`; `masks` (n, size, size)."""

    def __init__(self, split="train", transform=None, per_class=None, size=SIZE):
        self.images, self.masks, self.targets = _generate(split, per_class or PER_CLASS[split], size)
        self.classes, self.transform = list(CLASSES), transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), self.targets[i]


def draw_video(rng, label, frames=12, size=SIZE):
    """A sequence in which one object (class `label`) moves, turns and changes scale over clutter that pans:
    (list of PIL RGB images, list of (size, size) uint8 masks, 1 on the object)."""
    big = size * SUPERSAMPLE
    pan = rng.uniform(-0.25, 0.25, 2) * big / frames  # the background drifts by up to a quarter of the frame
    margin = int(np.ceil(np.abs(pan).max() * frames)) + 1
    background = _clutter(rng, big + 2 * margin, round(LEAVES * (1 + 2 * margin / big) ** 2))  # as dense as a scene's
    fill = _pattern(rng, label, _two_levels(rng), big)
    r0, r1 = rng.uniform(0.22, 0.34, 2) * big
    start, end = rng.uniform(0.3, 0.7, (2, 2)) * big
    a0 = rng.uniform(0, 2 * math.pi)
    turn = rng.uniform(-1, 1) * math.pi / 2  # up to a quarter turn over the sequence
    images, masks = [], []
    for t in np.linspace(0, 1, frames):
        ox, oy = (margin + pan * t * frames).round().astype(int)
        bg = background[oy:oy + big, ox:ox + big]
        (cx, cy), r = start + (end - start) * t, r0 + (r1 - r0) * t
        img, mask = _compose(bg, _object_alpha(label, cx, cy, r, a0 + turn * t, big), fill, size)
        images.append(img)
        masks.append(mask.astype(np.uint8))
    return images, masks


def video_sequences(split="val", n=None, frames=12, size=SIZE):
    """The embedded videos: [(name, frames, masks)], one object each, `n` of them (default: one per class)."""
    n = n or len(CLASSES)
    rng = np.random.RandomState(SEEDS[split] + 100)
    out = []
    for i in range(n):
        images, masks = draw_video(rng, i % len(CLASSES), frames, size)
        out.append((f"{CLASSES[i % len(CLASSES)]}-{i:02d}", images, masks))
    return out


def masks(split):
    """Ground-truth object masks of build_dataset('scenes', split), in the same order: (n, size, size) bool."""
    return ScenesDataset(split).masks


def palette():
    """The DAVIS / PASCAL VOC colour map: index i coloured by the bits of i, as both benchmarks' PNGs."""
    out = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += [r, g, b]
    return out


def save_mask(mask, path):
    """A uint8 label map (0 background, 1..K objects, 255 void) as a palette PNG, as VOC and DAVIS store them."""
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    img.putpalette(palette())
    img.save(path)


def write_folders(out):
    """The scenes as files: OUT/train/CLASS/*.png and OUT/val/CLASS/*.png (an ImageFolder), the val split again as
    PASCAL VOC (OUT/voc: JPEGImages/, SegmentationObject/, ImageSets/Segmentation/val.txt) and the videos as
    DAVIS-2017 (OUT/davis: JPEGImages/480p/SEQ/, Annotations/480p/SEQ/, ImageSets/2017/val.txt)."""
    from pathlib import Path
    out = Path(out)
    for split in ("train", "val"):
        ds = ScenesDataset(split)
        for i, (image, y) in enumerate(zip(ds.images, ds.targets)):
            d = out / split / CLASSES[y]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(d / f"{i:05d}.png")
    voc = out / "voc"
    for d in ("JPEGImages", "SegmentationObject", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    names = [f"{i:05d}" for i in range(len(ds))]  # ds: the val split
    for name, image, mask in zip(names, ds.images, ds.masks):
        Image.fromarray(image).save(voc / "JPEGImages" / f"{name}.png")  # lossless: the pixels of the val split
        save_mask(mask, voc / "SegmentationObject" / f"{name}.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(names) + "\n")
    davis = out / "davis"
    sequences = video_sequences("val")
    for name, frames, masks_ in sequences:
        for sub, items in (("JPEGImages", frames), ("Annotations", masks_)):
            (davis / sub / "480p" / name).mkdir(parents=True)
        for t, (frame, mask) in enumerate(zip(frames, masks_)):
            frame.save(davis / "JPEGImages" / "480p" / name / f"{t:05d}.jpg", quality=95)
            save_mask(mask, davis / "Annotations" / "480p" / name / f"{t:05d}.png")
    (davis / "ImageSets" / "2017").mkdir(parents=True)
    (davis / "ImageSets" / "2017" / "val.txt").write_text("\n".join(n for n, _, _ in sequences) + "\n")
