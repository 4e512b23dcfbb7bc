"""Image retrieval and copy detection with frozen features (paper Sec. 4.2.1 "Nearest neighbor retrieval with
DINO ViT", Tables 3 and 4; official eval_image_retrieval.py and eval_copy_detection.py).

    y_cls    = LN(z_L^0)                                 the CLS feature, as in 06_knn.py
    GeM_p(z) = ( 1/N sum_i max(z_L^i, 1e-6)^p )^(1/p)    generalised mean of the N patch tokens, p = 4, per channel
    f(x)     = [ y_cls ; GeM_4(z_L) ]                     the copy-detection descriptor ("both"), 2D wide
    f(x)    <- diag(lambda)^(-1/2) V^T (f(x) - mu)        optional PCA-whitening, power 0.5, learned on other images
    s(q, x)  = < f(q) / |f(q)|, f(x) / |f(x)| >            cosine; the database is ranked by it for each query
    AP       = sum_j (P_j-1 + P_j) / 2 / n_pos              trapezoids of the precision-recall curve, one per positive

No training and no labels: the features of a frozen network alone decide what is near what.

Protocols, as the official scripts run them:
- Copy detection (Copydays "strong", 229 copies of 157 originals: crops, rescaling, colour changes, blur,
  low-quality JPEG, print-and-scan, pasting into another picture): images resized to 320 x 320 (the whole image,
  no crop), descriptor "both", whitening learned on 20k unrelated images (YFCC100M), 10k distractors added to
  the database; mAP over the first 20 results. ViT-B/8 DINO: 85.5 mAP in the paper (the official README's run
  prints 85.8).
- Image retrieval (revisited Oxford and Paris, Radenovic et al. 2018): each image shrunk so its longer side is
  224 px (aspect kept, no crop; the official README runs rParis at 512 px), descriptor "cls" (rParis: averaged
  over scales 1, 1/sqrt(2), 1/2), the full database ranked for each of the 70 queries, which are used whole (the
  official DINO script does not crop them to their box); mAP on the Medium (easy and hard images count) and Hard
  (hard only, easy ones ignored) protocols, junk ignored in both. The paper's Table 3 compares ViT-S/16 DINO with
  supervised features, pretrained on ImageNet and on Google Landmarks v2.

Beyond the paper, the same parts on any folder (class folders or a flat folder of photos, or a built-in name):
`features` writes the embeddings (features.npy, files.csv), `neighbours` draws each query with its nearest
images for a trained network next to an untrained one, `copies` scores copy detection with strong copies made
from the folder's own images, `duplicates` lists the pairs of a folder above a similarity.

Departures:
- The whitening covariance is centred (a PCA's); the official code centres the features but computes the second
  moment of uncentred ones.
- Copy detection on any folder makes its own copies (see strong_copy); its numbers are not Copydays'.
- The similarity search runs in blocks of queries (at most BLOCK_ELEMENTS similarities at once), so a folder of
  100k images never becomes a 100k x 100k matrix; the official scripts build the whole matrix.
- Unreadable images in a folder are skipped and named; in the official benchmarks' layouts they are an error.

Usage:
    python 09_retrieval.py features   --checkpoint OUT/checkpoint.pth --data_path DIR --output_dir EMB
    python 09_retrieval.py neighbours --checkpoint OUT/checkpoint.pth --data_path textures --num_queries 6
    python 09_retrieval.py copies     --checkpoint OUT/checkpoint.pth --data_path textures --whiten
    python 09_retrieval.py copies     --raw_pixels --image_size 32 --data_path textures
    python 09_retrieval.py duplicates --features EMB --threshold 0.95
    python 09_retrieval.py copydays   --pretrained dino_vitb8 --data_path COPYDAYS --whitening YFCC20K \
                                      --distractors YFCC10K
    python 09_retrieval.py revisited  --pretrained dino_vits16 --data_path REVISITOP --dataset roxford5k
"""
import argparse
import csv
import importlib
import io
import math
import os
import pickle
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter
from torchvision import transforms
from torchvision.transforms import functional as TF

import checkpoint as ckpt
import cli
import data
import runtime

multicrop = importlib.import_module("01_multicrop")
knn = importlib.import_module("06_knn")

GEM_P, GEM_EPS = 4, 1e-6  # official: GeM exponent and clamp of the patch tokens
WHITEN_POWER = 0.5  # official: lambda^-0.5, full whitening
AP_TOP = 20  # official copy detection: the AP of the first 20 results
COPY_KINDS = ("crop", "rescale", "colour", "blur", "jpeg", "paste", "combined")
BLOCK_ELEMENTS = 2 ** 26  # similarities computed at once: 256 MiB of float32
MAX_WHITEN_DIM = 16384  # the covariance is D x D and its eigendecomposition O(D^3)


# ---------------------------------------------------------------------------- descriptors
def gem(tokens, p=GEM_P, eps=GEM_EPS):
    """Generalised mean over the patch tokens, per channel: (B, N-1, D) -> (B, D). p = 1 is the average, p -> inf
    the maximum; p = 4 leans towards the strongest responses, which survive crops and pasting."""
    return tokens.clamp(min=eps).pow(p).mean(dim=1).pow(1 / p)


def descriptor(kind):
    """embed(model, images) for 06_knn.embed_batches: 'cls', 'gem' or 'both' (CLS then GeM, the paper's
    copy-detection descriptor), or 'pixels' (the model is a Flatten: the raw-pixel baseline)."""
    def embed(model, images):
        if kind in ("cls", "pixels"):
            return model(images)  # (B, D)
        tokens = model.get_intermediate_layers(images, n=1)[0]  # (B, N, D), through the final norm
        pooled = gem(tokens[:, 1:])  # (B, D)
        return pooled if kind == "gem" else torch.cat([tokens[:, 0], pooled], dim=1)  # (B, 2D)
    return embed


def square_transform(image_size):
    """The whole image resized to image_size x image_size (official copy detection): a crop could cut away
    exactly the part a copy kept."""
    return transforms.Compose([
        transforms.Resize((image_size, image_size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(multicrop.IMAGENET_MEAN, multicrop.IMAGENET_STD),
    ])


class Thumbnail:
    """Official retrieval: shrink so that the longer side is at most `size`, aspect kept (never enlarge)."""

    def __init__(self, size):
        self.size = size
        self.tail = transforms.Compose([transforms.ToTensor(),
                                        transforms.Normalize(multicrop.IMAGENET_MEAN, multicrop.IMAGENET_STD)])

    def __call__(self, img):
        img = img.copy()
        img.thumbnail((self.size, self.size), Image.LANCZOS)
        return self.tail(img)  # (3, h, w)


# ---------------------------------------------------------------------------- the images of a folder
class Reader:
    """Opens an image by the name files.csv gives it: a file path, or NAME:SPLIT:INDEX for a built-in dataset
    (e.g. textures:val:17). Files are decoded at reduced size when far larger than `side` (data.open_image)."""

    def __init__(self, side=None, builtin=None):
        self.side, self.builtin = side, {} if builtin is None else builtin  # shared: a built-in set is drawn once

    def dataset(self, name, split):
        if (name, split) not in self.builtin:
            self.builtin[(name, split)] = data.build_dataset(name, split)
        return self.builtin[(name, split)]

    def __call__(self, name):
        parts = name.split(":")
        if len(parts) == 3 and parts[0] in data.BUILTIN and parts[2].isdigit():
            return self.dataset(parts[0], parts[1])[int(parts[2])][0]
        return data.open_image(name, self.side)


class Images(torch.utils.data.Dataset):
    """Images by name, each through `transform`. Item i: (image, i), or (zeros, -1) when image i cannot be read:
    skipped, its file named once in a warning, without shifting the other images of the batch. skip=False: an
    unreadable image is an error (an official benchmark must be complete)."""

    def __init__(self, names, labels, read, transform, size, skip=True):
        self.names, self.labels, self.read, self.transform = names, labels, read, transform
        self.size, self.skip = size, skip

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        try:
            return self.transform(self.read(self.names[i])), i
        except data.DataError as e:
            if not self.skip:
                raise
            warnings.warn(f"skipping {e}")
            return torch.zeros(3, self.size, self.size), -1


def file_images(paths, transform, size):
    """Images of a list of files, all of which must be readable (the official benchmarks' files)."""
    return Images(list(paths), [""] * len(paths), Reader(), transform, size, skip=False)


def folder_images(data_path, split, transform, size, reader):
    """Images of --data_path, labelled with their class folder ('' in a flat folder). split 'all': ROOT/train and
    ROOT/val when both exist (both splits of a built-in dataset), else the whole folder; 'train' or 'val': one."""
    if split != "all" and not data.has_val(data_path):
        raise cli.UsageError(f"--split {split} needs {data_path}/train and {data_path}/val; leave --split out to "
                             f"use the whole folder")
    splits = (["train", "val"] if data.has_val(data_path) else ["pretrain"]) if split == "all" else [split]
    names, labels = [], []
    for s in splits:
        if data_path in data.BUILTIN:
            ds = reader.dataset(data_path, s)
            targets = ds.targets if hasattr(ds, "targets") else ds.labels  # STL10 names them labels
            names += [f"{data_path}:{s}:{i}" for i in range(len(ds))]
            labels += [ds.classes[t] if t >= 0 else "" for t in targets]  # STL10's unlabelled images: -1
        else:
            ds = data.build_dataset(data_path, s)  # lists the files; nothing is decoded here
            names += [p for p, _ in ds.samples]
            labels += [ds.classes[t] for _, t in ds.samples]
    return Images(names, labels, reader, transform, size)


@torch.no_grad()
def extract(model, images, device, kind="cls", batch_size=64, num_workers=0, dtype=None, progress=None):
    """Descriptors of the readable images: (features (n, D) float32 on the CPU, not normalised; their indices in
    `images`, (n,)). Streams: one batch of decoded images at a time."""
    feats, kept = [], []
    for f, idx in knn.embed_batches(model, images, device, batch_size, num_workers, dtype, descriptor(kind),
                                    progress):
        ok = torch.as_tensor(idx) >= 0
        feats.append(f.cpu()[ok])
        kept.append(torch.as_tensor(idx)[ok])
    return torch.cat(feats), torch.cat(kept)


# ---------------------------------------------------------------------------- features out, and back in
def save_features(out_dir, features, names, labels, meta):
    """features.npy (float32, n x D, rows L2-normalised), files.csv (index, path, label) and features.json (how
    they were made). numpy's .npy and CSV open in any language without this project or PyTorch."""
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "features.npy", features.numpy().astype(np.float32))
    with open(out_dir / "files.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "path", "label"])
        w.writerows([i, n, l] for i, (n, l) in enumerate(zip(names, labels)))
    ckpt.save_json(meta, out_dir / "features.json")


def load_features(folder):
    """(features (n, D), names, labels) from a folder written by `features`, checked against each other."""
    folder = Path(folder)
    npy, files = folder / "features.npy", folder / "files.csv"
    for p in (npy, files):
        if not p.is_file():
            raise data.DataError(f"{p} does not exist; write it with `09_retrieval.py features --output_dir {folder}`")
    try:
        x = np.load(npy, allow_pickle=False)  # a .npy holding Python objects is refused, not run
    except Exception as e:
        raise data.DataError(f"{npy} is not a readable .npy file ({type(e).__name__}); write it again "
                             f"with `09_retrieval.py features`") from None
    try:
        with open(files, newline="") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise data.DataError(f"{files} is not a CSV file ({e}); write it again with `09_retrieval.py features`") \
            from None
    header, rows = (rows[0], rows[1:]) if rows else ([], [])
    if header != ["index", "path", "label"] or any(len(r) != 3 or r[0] != str(i) for i, r in enumerate(rows)):
        raise data.DataError(f"{files} is not a files list written by `features` (expected the columns index, path, "
                             f"label and indices 0, 1, 2, ...); write it again")
    if x.ndim != 2 or x.dtype.kind != "f" or len(x) != len(rows) or not len(rows) or not np.isfinite(x).all():
        raise data.DataError(f"{npy} ({'x'.join(map(str, x.shape))} {x.dtype}) does not match {files} ({len(rows)} "
                             f"files): expected one finite row of floats per file; write both again with `features`")
    return F.normalize(torch.from_numpy(x.astype(np.float32)), dim=1), [r[1] for r in rows], [r[2] for r in rows]


# ---------------------------------------------------------------------------- search, in blocks
def search(queries, database, k, exclude=None, block=None):
    """The k most similar database rows of each query, by dot product of normalised rows: (sims, indices), both
    (q, k), best first. Only (block, n) similarities exist at once. exclude: (q,) database index to leave out for
    each query (the query itself), or -1."""
    block = block or max(1, BLOCK_ELEMENTS // len(database))
    sims, idx = [], []
    for i in range(0, len(queries), block):
        s = queries[i:i + block] @ database.T  # (b, n)
        if exclude is not None:
            e = exclude[i:i + block]
            rows = torch.nonzero(e >= 0).flatten()
            s[rows, e[rows]] = -math.inf
        v, j = s.topk(k, dim=1)  # (b, k)
        sims.append(v), idx.append(j)
    return torch.cat(sims), torch.cat(idx)


def pairs_above(features, threshold, max_pairs=None, block=None):
    """Pairs i < j with cosine >= threshold, strongest first: (i, j, sims), each (m,), and how many there were in
    all. Blocks of rows against the columns from their first row on; only the strongest max_pairs are kept, so
    memory stays bounded however low the threshold."""
    n = len(features)
    block = block or max(1, BLOCK_ELEMENTS // n)
    ij, sims, total = torch.zeros(0, 2, dtype=torch.long), torch.zeros(0), 0
    for i in range(0, n, block):
        s = features[i:i + block] @ features[i:].T  # (b, n - i): columns i, i+1, ...
        b = len(s)
        s[:, :b].masked_fill_(torch.ones(b, b, dtype=torch.bool).tril(), -math.inf)  # j <= i: each pair once
        above = int((s >= threshold).sum())
        total += above
        if max_pairs and above > max_pairs:
            flat = s.flatten().topk(max_pairs).indices  # all of them above the threshold
            r, c = flat // s.shape[1], flat % s.shape[1]
        else:
            r, c = torch.nonzero(s >= threshold, as_tuple=True)
        ij, sims = torch.cat([ij, torch.stack([r + i, c + i], dim=1)]), torch.cat([sims, s[r, c]])
        if max_pairs and len(sims) > max_pairs:
            sims, keep = sims.topk(max_pairs)
            ij = ij[keep]
    order = sims.argsort(descending=True, stable=True)
    return ij[order, 0], ij[order, 1], sims[order], total


# ---------------------------------------------------------------------------- whitening
def learn_whitening(x, power=WHITEN_POWER):
    """(mu, P) with P = diag(lambda)^-power V^T, the eigenvectors of the covariance of x (n, D) by decreasing
    eigenvalue. Eigenvalues below 1e-5 of the largest are raised to it (official), so that directions the
    training images never vary in are not blown up without bound."""
    mu = x.double().mean(dim=0)
    xc = x.double() - mu
    lam, V = torch.linalg.eigh(xc.T @ xc / len(x))  # ascending
    lam, V = lam.flip(0).clamp(min=lam.max().item() * 1e-5), V.flip(1)
    return mu.float(), (V / lam ** power).T.float()  # (D,), (D, D)


def whiten(x, mu, P):
    return (x - mu) @ P.T  # (n, D)


# ---------------------------------------------------------------------------- average precision
def average_precision(ranks, n_positives):
    """AP from the 0-based ranks of the positives that were retrieved, as the Holidays, Copydays and revisited
    Oxford/Paris evaluations compute it: each positive adds a trapezoid of width 1/n_positives between the
    precision just before it (j / r; 1 at rank 0) and at it ((j + 1) / (r + 1)). Positives never retrieved
    add nothing."""
    ap = 0.0
    for j, r in enumerate(sorted(ranks)):
        before = 1.0 if r == 0 else j / r
        ap += (before + (j + 1) / (r + 1)) / 2 / n_positives
    return ap


def copy_scores(indices, positives):
    """(mAP %, top-1 %) of ranked results (q, k) against each query's set of positive database indices."""
    aps, top1 = [], []
    for row, pos in zip(indices.tolist(), positives):
        aps.append(average_precision([r for r, j in enumerate(row) if j in pos], len(pos)))
        top1.append(row[0] in pos)
    return 100 * float(np.mean(aps)), 100 * float(np.mean(top1))


def revisited_ap(order, ok, junk):
    """AP of one revisited Oxford/Paris query: `order` ranks the whole database; junk images are removed from
    it before the positives' ranks are read. None when the query has no positive (left out, as officially)."""
    if len(ok) == 0:
        return None
    order = order[~np.isin(order, junk)]
    return average_precision(np.nonzero(np.isin(order, ok))[0].tolist(), len(ok))


# ---------------------------------------------------------------------------- strong copies
def strong_copy(img, kind, rng, background=None):
    """One copy of a PIL image of the kinds in Copydays "strong": 'crop' (10-50 % of the area kept), 'rescale'
    (to 20-50 % of the size, aspect changed by up to 4:3), 'colour' (brightness, contrast, saturation, hue),
    'blur' (Gaussian, 1-3 % of the shorter side), 'jpeg' (quality 3-15), 'paste' (shrunk to 30-60 % and pasted
    into `background`), 'combined' (crop then two of rescale, colour, blur, jpeg), or 'exact'. rng: a numpy
    Generator: the same seed, the same copy."""
    img = img.convert("RGB")
    w, h = img.size
    if kind == "crop":
        area, aspect = rng.uniform(0.1, 0.5) * w * h, math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = min(w, max(1, round(math.sqrt(area * aspect)))), min(h, max(1, round(math.sqrt(area / aspect))))
        x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        return img.crop((x, y, x + cw, y + ch))
    if kind == "rescale":
        s, a = rng.uniform(0.2, 0.5), math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        return img.resize((max(1, round(w * s * math.sqrt(a))), max(1, round(h * s / math.sqrt(a)))), Image.BILINEAR)
    if kind == "colour":
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast):
            img = enhance(img).enhance(rng.uniform(0.5, 1.5))
        img = ImageEnhance.Color(img).enhance(rng.uniform(0.0, 2.0))
        return TF.adjust_hue(img, rng.uniform(-0.3, 0.3))
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.01, 0.03) * min(w, h)))
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(3, 16)))
        return Image.open(buf).convert("RGB")
    if kind == "paste":
        bg = (background or Image.new("RGB", (w, h), (128, 128, 128))).convert("RGB").resize((w, h), Image.BICUBIC)
        s = rng.uniform(0.3, 0.6)
        small = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
        bg.paste(small, (int(rng.integers(0, w - small.width + 1)), int(rng.integers(0, h - small.height + 1))))
        return bg
    if kind == "combined":
        img = strong_copy(img, "crop", rng)
        for k in rng.choice(["rescale", "colour", "blur", "jpeg"], 2, replace=False):
            img = strong_copy(img, k, rng)
        return img
    if kind == "exact":
        return img
    raise ValueError(kind)


class Copies(torch.utils.data.Dataset):
    """The queries of copy detection, made when read: item q is the copy (original, kind, background) number q,
    drawn from numpy's generator seeded by (seed, q)."""

    def __init__(self, plan, read, transform, seed):
        self.plan, self.read, self.transform, self.seed = plan, read, transform, seed

    def __len__(self):
        return len(self.plan)

    def make(self, q):
        original, kind, background = self.plan[q]
        bg = self.read(background) if kind == "paste" else None
        return strong_copy(self.read(original), kind, np.random.default_rng([self.seed, q]), bg)

    def __getitem__(self, q):
        return self.transform(self.make(q)), q


# ---------------------------------------------------------------------------- pictures
def thumb(img, side=96):
    img = img.convert("RGB")
    img.thumbnail((side, side), Image.LANCZOS)
    return img


def save_neighbours_figure(path, queries, panels, k):
    """queries: [(image, title)]; panels: [(model name, [[(image, title)] * k per query])], side by side."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is
    cols = len(panels) * (k + 1)  # the query, then each panel's k images with a blank column between panels
    fig = Figure(figsize=(1.3 * cols, 1.5 * len(queries)))
    axes = fig.subplots(len(queries), cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (img, title) in enumerate(queries):
        axes[r, 0].imshow(img), axes[r, 0].set_title(title, fontsize=7)
        for p, (name, rows) in enumerate(panels):
            for c, (im, t) in enumerate(rows[r]):
                ax = axes[r, 1 + p * (k + 1) + c]
                ax.imshow(im), ax.set_title(f"{name}\n{t}" if r == 0 and c == 0 else t, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def save_pairs_figure(path, pairs):
    """pairs: [(image_i, image_j, title)], one pair per column."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is
    fig = Figure(figsize=(1.6 * len(pairs), 3.4))
    axes = fig.subplots(2, len(pairs), squeeze=False)
    for c, (a, b, title) in enumerate(pairs):
        axes[0, c].imshow(a), axes[1, c].imshow(b)
        axes[0, c].set_title(title, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# ---------------------------------------------------------------------------- the official layouts
COPYDAYS_BLOCKS = ["strong"] + [f"jpegqual/{q}" for q in (3, 5, 8, 10, 15, 20, 30, 50, 75)] + \
                  [f"crops/{c}" for c in (10, 15, 20, 30, 40, 50, 60, 70, 80)]


def jpgs(folder):
    return sorted(str(p) for p in Path(folder).iterdir() if p.name.endswith(".jpg"))


def copydays_queries(root):
    """[(block, query files, positives per query)] of a Copydays folder (ROOT/original, ROOT/strong, and the
    jpegqual/ and crops/ blocks where present) and the original files. A strong copy's positives are the
    originals whose file names share its first four characters (an original and its copies share a number);
    each other block holds one copy of each original, in the originals' order."""
    root = Path(root)
    if not (root / "original").is_dir() or not (root / "strong").is_dir():
        raise data.DataError(f"{root} is not laid out as Copydays: expected {root}/original/*.jpg and "
                             f"{root}/strong/*.jpg (and optionally jpegqual/N/ and crops/N/)")
    originals = jpgs(root / "original")
    if not originals:
        raise data.DataError(f"no .jpg files in {root}/original; expected the 157 Copydays originals")
    blocks = []
    for block in COPYDAYS_BLOCKS:
        if not (root / block).is_dir():
            continue
        files = jpgs(root / block)
        if block == "strong":
            positives = [{i for i, o in enumerate(originals) if Path(o).name[:4] == Path(q).name[:4]} for q in files]
        elif len(files) == len(originals):
            positives = [{i} for i in range(len(files))]
        else:
            raise data.DataError(f"{root}/{block} holds {len(files)} .jpg files for {len(originals)} originals; "
                                 f"expected one copy of each")
        if not files or not all(positives):
            problem = "no .jpg files" if not files else "a copy whose first four characters name no original"
            raise data.DataError(f"{root}/{block}: {problem}; check the Copydays folder")
        blocks.append((block, files, positives))
    return blocks, originals


class _GroundTruth(pickle.Unpickler):
    """Unpickles plain Python values and numpy arrays only: a pickle can name any function to call, and a
    ground-truth file needs none."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a ground-truth file")


def revisited_ground_truth(root, dataset):
    """(image dir, database names, query names, [(easy, hard, junk) per query]) from the revisited Oxford/Paris
    layout: ROOT/<dataset>/gnd_<dataset>.pkl (a dict: 'imlist', 'qimlist', and 'gnd', one dict per query with
    'easy', 'hard', 'junk' database indices and 'bbx') and the images ROOT/<dataset>/jpg/<name>.jpg."""
    base = Path(root) / dataset if (Path(root) / dataset).is_dir() else Path(root)
    gnd_file = base / f"gnd_{dataset}.pkl"
    if not gnd_file.is_file():
        raise data.DataError(f"no {gnd_file}; expected the revisited layout ROOT/{dataset}/gnd_{dataset}.pkl and "
                             f"ROOT/{dataset}/jpg/*.jpg")
    try:
        with open(gnd_file, "rb") as f:
            cfg = _GroundTruth(f).load()
        imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
        truth = [tuple(np.asarray(g[key], dtype=np.int64).reshape(-1) for key in ("easy", "hard", "junk"))
                 for g in gnd]
        ok = (all(isinstance(s, str) for s in imlist + qimlist) and len(truth) == len(qimlist) and
              all(((0 <= t) & (t < len(imlist))).all() for g in truth for t in g))
    except Exception as e:
        raise data.DataError(f"{gnd_file} is not a revisited ground-truth file ({type(e).__name__}: "
                             f"{str(e)[:200]}); download it again") from None
    if not ok or not qimlist:
        raise data.DataError(f"{gnd_file} does not hold names and in-range indices ('imlist', 'qimlist', 'gnd'); "
                             f"download it again")
    return base / "jpg", imlist, qimlist, truth


# ---------------------------------------------------------------------------- the command line
def add_source(p, features=False):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint written by train.py (architecture and size read from it)")
    src.add_argument("--pretrained", help=cli.PRETRAINED_HELP)
    src.add_argument("--random_init", action="store_true", help="an untrained network: the baseline to read against")
    src.add_argument("--raw_pixels", action="store_true", help="the normalised pixels themselves: the other baseline")
    if features:
        src.add_argument("--features", help="a folder written by `features` (features.npy and files.csv)")
    p.add_argument("--checkpoint_key", default="teacher", choices=["teacher", "student"],
                   help="the paper evaluates the teacher")
    p.add_argument("--arch", default="vit_small", choices=sorted(knn.vits.ARCHS),
                   help="for --pretrained / --random_init")
    p.add_argument("--patch_size", "--patch", type=cli.patch_size, default=16)
    p.add_argument("--descriptor", choices=["cls", "gem", "both"], default=None,
                   help="cls: the CLS feature (retrieval); gem: GeM (p = 4) of the patch tokens; both: the two "
                        "concatenated, the paper's copy-detection descriptor")
    p.add_argument("--batch_size", type=cli.positive_int, default=64, help="images decoded and embedded at once")
    p.add_argument("--num_workers", type=cli.nonneg_int, default=2, help="processes decoding images")
    p.add_argument("--output_dir", type=cli.directory, default="retrieval", help="where the outputs go")


def add_folder(p, size_default=None, size_help="square resize; default: a train.py checkpoint's crop size, else 224"):
    p.add_argument("--data_path", default="textures",
                   help="class folders (ROOT/class/img) or a flat folder of images, or " + ", ".join(data.BUILTIN))
    p.add_argument("--split", default=None, choices=["all", "train", "val"],
                   help="all (the default; copies: val where it exists, with train to learn the whitening): "
                        "ROOT/train and ROOT/val where both exist, else the whole folder")
    p.add_argument("--image_size", type=cli.positive_int, default=size_default, help=size_help)


def get_args_parser():
    p = cli.Parser(description="Retrieval with frozen DINO features: embeddings out, nearest neighbours, copy "
                               "detection, near-duplicates, and the paper's Copydays and revisited Oxford/Paris protocols")
    sub = p.add_subparsers(dest="command", required=True, parser_class=cli.Parser, metavar="COMMAND",
                           help="features, neighbours, copies, duplicates, copydays or revisited")
    s = sub.add_parser("features", help="features.npy + files.csv of every readable image of a folder")
    add_source(s), add_folder(s)
    s = sub.add_parser("neighbours", help="a picture of queries and their nearest images, trained next to random init")
    add_source(s), add_folder(s)
    s.add_argument("--queries", nargs="+", default=None, help="query image files; default: random images of the folder")
    s.add_argument("--num_queries", type=cli.positive_int, default=6)
    s.add_argument("--k", type=cli.positive_int, default=5)
    s.add_argument("--seed", type=cli.seed, default=0)
    s = sub.add_parser("copies", help="copy detection with strong copies made from the folder's images: mAP, top-1")
    add_source(s), add_folder(s)
    s.add_argument("--num_originals", type=cli.positive_int, default=100,
                   help="images copied, each once per kind of copy; the rest of the folder are distractors")
    s.add_argument("--whiten", action="store_true",
                   help="PCA-whitening (power 0.5) learned on ROOT/train (else on the distractors)")
    s.add_argument("--seed", type=cli.seed, default=0)
    s = sub.add_parser("duplicates", help="pairs of a folder above a cosine similarity: duplicates.csv and a picture")
    add_source(s, features=True), add_folder(s)
    s.add_argument("--threshold", type=cli.cosine, default=0.95, help="cosine similarity in [-1, 1]")
    s.add_argument("--max_pairs", type=cli.positive_int, default=100000, help="keep the strongest pairs only")
    s = sub.add_parser("copydays", help="the paper's copy detection on a Copydays folder (mAP on 'strong')")
    add_source(s)
    s.add_argument("--data_path", required=True, help="Copydays: ROOT/original/*.jpg, ROOT/strong/*.jpg, ...")
    s.add_argument("--distractors", default=None, help="a folder of images added to the database (paper: 10k YFCC)")
    s.add_argument("--whitening", default=None, help="a folder of images to learn the whitening on (paper: 20k YFCC)")
    s.add_argument("--image_size", type=cli.positive_int, default=320, help="square resize (official: 320)")
    s = sub.add_parser("revisited", help="the paper's image retrieval on revisited Oxford or Paris (mAP M and H)")
    add_source(s)
    s.add_argument("--data_path", required=True, help="ROOT holding <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/")
    s.add_argument("--dataset", default="roxford5k", choices=["roxford5k", "rparis6k"])
    s.add_argument("--image_size", type=cli.positive_int, default=224, help="longer side (official: 224)")
    s.add_argument("--multiscale", action="store_true", help="average the CLS over scales 1, 1/sqrt(2), 1/2")
    return p


DEFAULT_DESCRIPTOR = {"features": "cls", "neighbours": "cls", "copies": "both", "duplicates": "both",
                      "copydays": "both", "revisited": "cls"}


def prepare(args):
    """Everything that can be wrong with the input, found before any work: (model, image size, descriptor)."""
    cli.check_output_dir(args.output_dir)
    if getattr(args, "features", None):
        return None, None, None
    if args.raw_pixels and args.descriptor not in (None, "cls"):
        raise cli.UsageError(f"--descriptor {args.descriptor} pools a ViT's patch tokens; --raw_pixels has none "
                             f"(leave --descriptor out)")
    kind = "pixels" if args.raw_pixels else args.descriptor or DEFAULT_DESCRIPTOR[args.command]
    if args.command == "revisited" and args.multiscale and kind != "cls":
        raise cli.UsageError("--multiscale averages the CLS feature (official); use it with --descriptor cls")
    model, image_size, _ = knn.build_backbone(args)  # sets --arch, --patch_size (and the size) from the source
    dim = 3 * image_size ** 2 if args.raw_pixels else model.cls_token.shape[-1] * (2 if kind == "both" else 1)
    if (getattr(args, "whiten", False) or getattr(args, "whitening", None)) and dim > MAX_WHITEN_DIM:
        raise cli.UsageError(f"whitening {dim}-dimensional features needs a {dim} x {dim} covariance (at most "
                             f"{MAX_WHITEN_DIM}); lower --image_size (raw pixels: 3 x size^2 dimensions)")
    return model, image_size, kind


def source_name(args):
    return ("random init" if args.random_init else "raw pixels" if args.raw_pixels
            else args.checkpoint or args.pretrained)


def suffix(args):
    return "_random_init" if args.random_init else "_raw_pixels" if args.raw_pixels else ""


class Run:
    """What every command needs: the model, device and loader settings; extract() streams a set of images."""

    def __init__(self, args, model, image_size, kind):
        self.args, self.image_size, self.kind = args, image_size, kind
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = runtime.inference_dtype(self.device)
        self.model = model.to(self.device)
        self.reader = Reader(side=2 * image_size)  # at least twice the pixels the resize keeps

    def extract(self, images, what, model=None):
        return extract(model or self.model, images, self.device, self.kind, self.args.batch_size,
                       self.args.num_workers, self.dtype, progress=what)

    def folder(self, split):
        return folder_images(self.args.data_path, split, square_transform(self.image_size), self.image_size,
                             self.reader)


def readable(feats, kept, what):
    if not len(kept):
        raise data.DataError(f"no readable image in {what}; check the files")
    return feats, kept


def cmd_features(run, args):
    images = run.folder(args.split or "all")
    t0 = time.perf_counter()
    feats, kept = readable(*run.extract(images, "features"), args.data_path)
    seconds = time.perf_counter() - t0
    out = Path(args.output_dir)
    save_features(out, F.normalize(feats, dim=1), [images.names[i] for i in kept], [images.labels[i] for i in kept],
                  {"source": str(source_name(args)), "arch": args.arch, "patch_size": args.patch_size,
                   "image_size": run.image_size, "descriptor": run.kind, "data_path": args.data_path,
                   "normalised": "L2"})
    print(f"{len(kept)} images ({len(images) - len(kept)} unreadable, skipped) -> {tuple(feats.shape)} {run.kind} "
          f"features in {seconds:.1f} s ({len(kept) / seconds:.1f} img/s); wrote {out / 'features.npy'}, "
          f"{out / 'files.csv'}")


def cmd_neighbours(run, args):
    images = run.folder(args.split or "all")
    query_images = None
    if args.queries:  # each must be an image: read now, before any work
        for q in args.queries:
            data.open_image(q, run.image_size * 2)
        query_images = file_images(args.queries, square_transform(run.image_size), run.image_size)
    if args.k > len(images) - (query_images is None):  # again below, if unreadable images leave fewer
        raise cli.UsageError(f"--k {args.k} is more than the {len(images) - (query_images is None)} other images of "
                             f"{args.data_path}; lower --k")
    models = [(source_name(args), run.model)]
    if not (args.random_init or args.raw_pixels):  # the same architecture, untrained: what training added
        torch.manual_seed(0)
        baseline = argparse.Namespace(**{**vars(args), "checkpoint": None, "pretrained": None, "random_init": True})
        models.append(("random init", knn.build_backbone(baseline)[0].to(run.device)))
    panels, queries = [], None
    for name, model in models:
        feats, kept = readable(*run.extract(images, f"database ({name})", model), args.data_path)
        db = F.normalize(feats, dim=1)
        if queries is None:  # drawn once, among the readable images, so that both panels show the same queries
            if query_images is None:
                pick = np.random.RandomState(args.seed).choice(len(kept), min(args.num_queries, len(kept)), False)
                queries = [(images.names[kept[i]], int(i)) for i in pick]
            else:
                where = {os.path.realpath(images.names[i]): r for r, i in enumerate(kept.tolist())}
                queries = [(q, where.get(os.path.realpath(q), -1)) for q in args.queries]  # -1: not in the folder
            in_db = max(r >= 0 for _, r in queries)
            if args.k > len(kept) - in_db:
                raise cli.UsageError(f"--k {args.k} is more than the {len(kept) - in_db} other images of "
                                     f"{args.data_path}; lower --k")
        if query_images is None:
            q = db[[r for _, r in queries]]
        else:
            q = F.normalize(run.extract(query_images, "queries", model)[0], dim=1)
        sims, idx = search(q, db, args.k, exclude=torch.tensor([r for _, r in queries]))
        found = [[(images.names[kept[j]], s) for s, j in zip(srow.tolist(), jrow.tolist())]
                 for srow, jrow in zip(sims, idx)]  # per query: (name, similarity) of its k neighbours
        panels.append((name, [[(thumb(run.reader(n)), f"{s:.3f}") for n, s in row] for row in found]))
        print(f"{name}:")
        for (qname, _), row in zip(queries, found):
            print(f"  {qname}: " + ", ".join(f"{n} ({s:.3f})" for n, s in row))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"neighbours{suffix(args)}.png"
    save_neighbours_figure(path, [(thumb(run.reader(q)), f"query\n{Path(q).name[-18:]}") for q, _ in queries],
                           panels, args.k)
    print(f"saved {path}")


def cmd_copies(run, args):
    has_train = data.has_val(args.data_path)
    images = run.folder(args.split or ("val" if has_train else "all"))
    db, kept = readable(*run.extract(images, "database"), args.data_path)
    if len(kept) < 2:
        raise data.DataError(f"{args.data_path} has {len(kept)} readable image; copy detection needs at least 2")
    rng = np.random.RandomState(args.seed)
    originals = rng.choice(len(kept), min(args.num_originals, len(kept)), replace=False)  # rows of db
    plan, positives = [], []
    for o in originals:
        others = rng.randint(len(kept) - 1)
        background = others + (others >= o)  # any other image of the folder
        for kind in COPY_KINDS:
            plan.append((images.names[kept[o]], kind, images.names[kept[background]]))
            positives.append({int(o)})
    # originals decoded at 4x: a crop keeping 10 % of the area still has more pixels than the resize keeps
    copies = Copies(plan, Reader(4 * run.image_size, run.reader.builtin), square_transform(run.image_size), args.seed)
    q, _ = run.extract(copies, "copies")
    if args.whiten:
        if has_train and args.split != "train":
            train = run.folder("train")
            sample, _ = run.extract(train, "whitening")
            learned_on = f"{args.data_path}/train ({len(sample)} images)"
        else:
            sample = db[np.setdiff1d(np.arange(len(db)), originals)]
            learned_on = f"the {len(sample)} distractors"
        mu, P = learn_whitening(sample)
        db, q = whiten(db, mu, P), whiten(q, mu, P)
    sims, idx = search(F.normalize(q, dim=1), F.normalize(db, dim=1), min(AP_TOP, len(db)))
    mAP, top1 = copy_scores(idx, positives)
    per_kind = {kind: copy_scores(idx[i::len(COPY_KINDS)], positives[i::len(COPY_KINDS)])
                for i, kind in enumerate(COPY_KINDS)}
    print(f"{source_name(args)} ({run.kind} at {run.image_size} px) on {args.data_path}: {len(plan)} copies of "
          f"{len(originals)} images, database {len(db)}{', whitened on ' + learned_on if args.whiten else ''}")
    for kind, (m, t) in per_kind.items():
        print(f"  {kind:>9}: mAP {m:5.1f}  top-1 {t:5.1f}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.save_json({"source": str(source_name(args)), "data_path": args.data_path, "descriptor": run.kind,
                    "image_size": run.image_size, "whiten": args.whiten, "seed": args.seed, "database": len(db),
                    "queries": len(plan), "mAP": mAP, "top1": top1,
                    "per_kind": {k: {"mAP": m, "top1": t} for k, (m, t) in per_kind.items()}},
                   out / f"copy_detection{suffix(args)}.json")
    example = [(thumb(copies.make(i)), f"{plan[i][1]}: {'found' if idx[i, 0] == originals[0] else 'missed'}")
               for i in range(len(COPY_KINDS))]  # the first original's copies, and whether it came first
    save_neighbours_figure(out / f"copies{suffix(args)}.png", [(thumb(run.reader(plan[0][0])), "original")],
                           [("its copies", [example])], len(COPY_KINDS))
    print(f"top-1 {top1:.1f}%; copy detection mAP: {mAP:.1f}")


def cmd_duplicates(run, args):
    if args.features:
        db, names, _ = load_features(args.features)
        read = Reader()
    else:
        images = run.folder(args.split or "all")
        feats, kept = readable(*run.extract(images, "features"), args.data_path)
        db, names, read = F.normalize(feats, dim=1), [images.names[i] for i in kept], run.reader
    i, j, sims, total = pairs_above(db, args.threshold, args.max_pairs)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "duplicates.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["similarity", "index_a", "path_a", "index_b", "path_b"])
        w.writerows([f"{s:.6f}", a, names[a], b, names[b]] for a, b, s in zip(i.tolist(), j.tolist(), sims.tolist()))
    kept = "" if total <= len(sims) else f" (the strongest {len(sims)} kept: --max_pairs)"
    print(f"{total} pairs of {len(names)} images at cosine >= {args.threshold}{kept}; wrote {out / 'duplicates.csv'}")
    if len(sims):
        top = [(thumb(read(names[a])), thumb(read(names[b])), f"{s:.3f}")
               for a, b, s in zip(i[:8].tolist(), j[:8].tolist(), sims[:8].tolist())]
        save_pairs_figure(out / "duplicates.png", top)
        print(f"saved {out / 'duplicates.png'}")


def cmd_copydays(run, args):
    blocks, originals = copydays_queries(args.data_path)
    sq = square_transform(run.image_size)
    db = run.extract(file_images(originals, sq, run.image_size), "originals")[0]
    if args.distractors:
        distractors = folder_images(args.distractors, "all", sq, run.image_size, Reader())
        db = torch.cat([db, readable(*run.extract(distractors, "distractors"), args.distractors)[0]])
    queries = [(block, run.extract(file_images(q, sq, run.image_size), block)[0], pos) for block, q, pos in blocks]
    if args.whitening:
        sample = folder_images(args.whitening, "all", sq, run.image_size, Reader())
        mu, P = learn_whitening(readable(*run.extract(sample, "whitening"), args.whitening)[0])
        db = whiten(db, mu, P)
        queries = [(b, whiten(q, mu, P), pos) for b, q, pos in queries]
    db = F.normalize(db, dim=1)
    results = {}
    for block, q, pos in queries:
        _, idx = search(F.normalize(q, dim=1), db, min(AP_TOP, len(db)))
        results[block] = copy_scores(idx, pos)
        print(f"  {block:>12}: mAP {results[block][0]:5.1f}  top-1 {results[block][1]:5.1f}  ({len(q)} queries)")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.save_json({"source": str(source_name(args)), "descriptor": run.kind, "image_size": run.image_size,
                    "database": len(db), "whitening": args.whitening, "distractors": args.distractors,
                    "blocks": {b: {"mAP": m, "top1": t} for b, (m, t) in results.items()}},
                   out / f"copydays{suffix(args)}.json")
    print(f"copy detection mAP: {results['strong'][0]:.1f}")


def multiscale_embed(model, images):
    """Official multi-scale retrieval: the CLS at scales 1, 1/sqrt(2) and 1/2 (bilinear), averaged."""
    f = sum(model(images if s == 1 else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False))
            for s in (1, 2 ** -0.5, 0.5))
    return f / 3


def cmd_revisited(run, args):
    jpg, imlist, qimlist, truth = revisited_ground_truth(args.data_path, args.dataset)
    embed = multiscale_embed if args.multiscale else descriptor(run.kind)
    feats = []
    for names, what in ((imlist, "database"), (qimlist, "queries")):  # sizes differ: one image per batch
        images = file_images([str(jpg / f"{n}.jpg") for n in names], Thumbnail(run.image_size), run.image_size)
        f = [x.cpu() for x, _ in knn.embed_batches(run.model, images, run.device, 1, args.num_workers, run.dtype,
                                                   embed, what)]
        feats.append(F.normalize(torch.cat(f), dim=1))
    db, q = feats
    order = (q @ db.T).argsort(dim=1, descending=True).numpy()  # (nq, n): 70 queries, the whole database
    scores = {}
    for protocol in ("medium", "hard"):
        aps = [revisited_ap(o, np.concatenate([e, h]) if protocol == "medium" else h,
                            j if protocol == "medium" else np.concatenate([j, e]))
               for o, (e, h, j) in zip(order, truth)]
        scores[protocol] = 100 * float(np.mean([a for a in aps if a is not None]))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.save_json({"source": str(source_name(args)), "dataset": args.dataset, "image_size": run.image_size,
                    "multiscale": args.multiscale, "mAP_medium": scores["medium"], "mAP_hard": scores["hard"]},
                   out / f"{args.dataset}{suffix(args)}.json")
    print(f"{args.dataset} mAP: M {scores['medium']:.1f}, H {scores['hard']:.1f}")


COMMANDS = {"features": cmd_features, "neighbours": cmd_neighbours, "copies": cmd_copies,
            "duplicates": cmd_duplicates, "copydays": cmd_copydays, "revisited": cmd_revisited}


def main(args):
    torch.manual_seed(0)
    model, image_size, kind = prepare(args)
    run = Run(args, model, image_size, kind) if model is not None else None
    COMMANDS[args.command](run, args)


if __name__ == "__main__":
    sys.exit(cli.run(main, get_args_parser().parse_args))
