"""Small real datasets, written to a folder offline as ImageFolders (ROOT/train, ROOT/val): `python data.py
--make NAME DIR`. Benchmarks of the kind of folder a course points train.py at, made from images that ship
inside installed packages (scikit-image, scikit-learn, matplotlib: no download), and `jpegs`, an ImageNet-like
folder for timing the input pipeline. The same files and seed give the same folder on every machine.
scikit-image and scikit-learn are needed here only, never for training.
"""
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

# name: (the package that ships it, its file); one class per photograph
PHOTOGRAPHS = {
    "astronaut": ("skimage", "astronaut.png"), "cat": ("skimage", "chelsea.png"), "coffee": ("skimage", "coffee.png"),
    "galaxies": ("skimage", "hubble_deep_field.jpg"), "tissue": ("skimage", "ihc.png"),
    "motorcycle": ("skimage", "motorcycle_left.png"), "retina": ("skimage", "retina.jpg"),
    "rocket": ("skimage", "rocket.jpg"), "portrait": ("matplotlib", "grace_hopper.jpg"),
    "temple": ("sklearn", "china.jpg"), "flower": ("sklearn", "flower.jpg"),
}
SURFACES = ("brick", "grass", "gravel", "moon", "cell", "coins", "page")  # gray photographs in scikit-image's data


def _shipped(package, name):
    """The path of an image file that ships with an installed package."""
    if package == "matplotlib":
        import matplotlib
        return Path(matplotlib.get_data_path()) / "sample_data" / name
    if package == "sklearn":
        import sklearn
        return Path(sklearn.__file__).parent / "datasets" / "images" / name
    import skimage
    return Path(skimage.__file__).parent / "data" / name


def _decoded(package, name):
    """The image, decoded; scikit-image's as their pixels alone (as skimage.io reads them: no ICC profile or
    comment passed on to the crops)."""
    img = Image.open(_shipped(package, name))
    img.load()
    return Image.fromarray(np.asarray(img)) if package == "skimage" else img


def _photos():
    """Eleven colour photographs: people, animals, objects, scenes, a microscope slide, a retina, the sky."""
    return {name: _decoded(*PHOTOGRAPHS[name]) for name in PHOTOGRAPHS}


def _gray_surfaces():
    """Seven gray images of surfaces and materials: brick, grass, gravel, the moon, cells, coins, printed text."""
    return {name: _decoded("skimage", f"{name}.png") for name in SURFACES}


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


# the colour photographs but the microscope slide, in the order that fixes the folder's bytes
JPEG_CLASSES = ("astronaut", "cat", "coffee", "motorcycle", "rocket", "galaxies", "retina", "flower", "temple",
                "portrait")


def make_jpegs(out_dir, per_class={"train": 30, "val": 10}, size=(500, 375), quality=90, seed=0):
    """An ImageNet-like ImageFolder, OUT/{train,val}/<photograph>/NNN.jpg: 400 JPEGs of 500 x 375
    (a quarter of them 375 x 500, portrait) at quality 90, each a random crop (25-100 % of the area,
    the output's aspect ratio), possibly mirrored, of one of ten photographs. ImageNet's typical file
    size and compression, so decoding and cropping cost what they cost there; the same bytes on every
    run (given the same Pillow). Few classes of one photograph each: for timing the input pipeline,
    not for judging features."""
    rng = np.random.RandomState(seed)
    out_dir = Path(out_dir)
    for name in JPEG_CLASSES:
        photo = Image.open(_shipped(*PHOTOGRAPHS[name])).convert("RGB")
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


# Shapes: ten kinds of outline, and ten letters in the fonts matplotlib ships. Gray, 32 x 32 px, each at a random
# place, size, angle and stroke; drawn four times larger and reduced (smooth edges).
OUTLINES = ("circle", "triangle", "square", "pentagon", "hexagon", "star", "cross", "arrow", "heart", "crescent")
GLYPHS = "ABCDEFGHJK"
FONTS = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique", "DejaVuSansMono",
         "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique", "DejaVuSerif",
         "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic", "STIXGeneral", "STIXGeneralBol",
         "STIXGeneralItalic", "STIXGeneralBolIta", "cmr10", "cmb10", "cmss10", "cmti10", "cmtt10", "cmmi10")


def _arc(start, stop, radius=1.0, centre=(0.0, 0.0), n=48):
    t = np.linspace(start, stop, n)
    return np.stack([centre[0] + radius * np.cos(t), centre[1] + radius * np.sin(t)], 1)


def _outline(kind):
    """The shape as a closed polygon around the origin, inside the unit circle."""
    if kind == "circle":
        return _arc(0, 2 * np.pi)
    if kind == "crescent":  # the unit circle less a circle of radius 0.85 centred at (-0.4, 0): they meet at ±123°
        return np.concatenate([_arc(-2.15, 2.15), _arc(1.745, -1.745, 0.85, (-0.4, 0.0))])
    if kind == "heart":
        t = np.linspace(0, 2 * np.pi, 64)
        x, y = 16 * np.sin(t) ** 3, 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return np.stack([x, 2 - y], 1) / 17
    if kind == "cross":
        a, b = 0.9, 0.3
        return np.array([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b),
                         (-a, -b), (-b, -b)])
    if kind == "arrow":
        return 0.95 * np.array([(1, 0), (0.1, -0.8), (0.1, -0.3), (-1, -0.3), (-1, 0.3), (0.1, 0.3), (0.1, 0.8)])
    k = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6, "star": 10}[kind]
    t = 2 * np.pi * np.arange(k) / k
    r = np.where(np.arange(k) % 2, 0.45, 1.0) if kind == "star" else 1.0
    return np.stack([r * np.sin(t), -r * np.cos(t)], 1)


def _draw_outline(kind, rng, side):
    """A mask (PIL, mode L, side x side) with the shape's outline at a random place, size, angle and stroke."""
    from PIL import ImageDraw
    a = rng.uniform(-np.pi, np.pi)
    points = _outline(kind) @ np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    points = points * side * rng.uniform(0.25, 0.45) + side * (0.5 + rng.uniform(-0.12, 0.12, 2))
    mask = Image.new("L", (side, side))
    ImageDraw.Draw(mask).line([tuple(p) for p in np.concatenate([points, points[:1]])], fill=255,
                              width=max(1, round(side * rng.uniform(0.03, 0.08))), joint="curve")
    return mask


def _draw_glyph(letter, rng, side):
    """A mask with the letter in a random font of FONTS, at a random place, size and slant (±20 degrees)."""
    import matplotlib
    from PIL import ImageDraw, ImageFont
    font = FONTS[rng.randint(len(FONTS))]
    font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / f"{font}.ttf"),
                              round(side * rng.uniform(0.5, 0.8)))
    mask = Image.new("L", (side, side))
    ImageDraw.Draw(mask).text(tuple(side * (0.5 + rng.uniform(-0.1, 0.1, 2))), letter, fill=255, font=font,
                              anchor="mm")
    return mask.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR)


def _write_drawn(draw, classes, out, any_gray, per_class=500, side=32, seed=0):
    """per_class images of each class, drawn by draw(cls, rng, 4 * side) as a mask and reduced to side x side;
    light on dark, or (any_gray) a random gray on another at least 100 levels apart. Every fifth goes to val/."""
    rng = np.random.RandomState(seed)
    for label in classes:
        for i in range(per_class):
            mask = np.asarray(draw(label, rng, 4 * side).resize((side, side), Image.BOX), np.float32) / 255
            ink, paper = rng.uniform(0, 255, 2) if any_gray else (rng.uniform(200, 255), rng.uniform(0, 55))
            if abs(ink - paper) < 100:
                ink, paper = (ink + paper) / 2 + 50, (ink + paper) / 2 - 50
            d = Path(out) / ("val" if i % 5 == 4 else "train") / label
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray((paper + (ink - paper) * mask).clip(0, 255).round().astype(np.uint8)).save(
                d / f"{i:04d}.png")


MAKERS = {
    "digits": make_digits,
    "photos": lambda out: _write_crops(_photos(), out, 400, (0.15, 0.45), "jpg"),  # 4,400 colour crops
    "surfaces": lambda out: _write_crops(_gray_surfaces(), out, 400, (0.1, 0.3), "png"),  # 2,800 gray crops
    "outlines": lambda out: _write_drawn(_draw_outline, OUTLINES, out, False),  # 5,000 outlines, light on dark
    "glyphs": lambda out: _write_drawn(_draw_glyph, GLYPHS, out, True),  # 5,000 letters in 22 fonts, any grays
    "jpegs": make_jpegs,  # 400 ImageNet-size JPEGs, for timing the input pipeline
    "scenes": lambda out: __import__("scenes").write_folders(out),  # the embedded scenes, also as VOC and DAVIS
}


def make(name, out):
    """`python data.py --make NAME DIR`: MAKERS[name] into DIR, a new or empty folder. It is built in a hidden
    folder beside DIR and renamed to DIR when complete, so that a failure (a full disk, Ctrl-C) leaves no
    half-written DIR to block the next try."""
    from checkpoint import WriteError
    from cli import UsageError, check_output_dir
    out = Path(out)
    if name not in MAKERS:
        raise UsageError(f"unknown dataset {name}; choose from {', '.join(MAKERS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty directory; choose a new directory")
    check_output_dir(out, "DIR")
    where = next(p for p in out.absolute().parents if p.exists())  # the deepest existing folder above DIR
    tmp = None
    try:
        tmp = tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=where)
        MAKERS[name](tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)  # onto an empty folder too
    except BaseException as e:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise WriteError(f"cannot write {out} ({e.strerror or e}); nothing was left behind; free some space "
                             f"and run the same command again") from None
        raise
    n = {split: sum(1 for _ in (out / split).rglob("*.*")) for split in ("train", "val")}
    print(f"{name}: {n['train']} training and {n['val']} validation images in {out}")
