"""Segmentation in the self-attention, measured (paper Sec. 4.2.2 "Probing the self-attention map", Fig. 4).

    a^h     = CLS-to-patch attention of the last block, head h, over the patches   (07_attention.attention_maps)
    M^h     = the smallest set of patches holding t of a^h's mass, upsampled by the patch size (nearest)
    J(M, G) = |M ∩ G| / |M ∪ G|        the Jaccard similarity with the ground-truth object mask G

t = 0.6, as the paper's figure and table. J is computed per image and head, pixels marked void in the ground
truth (255 in PASCAL VOC) left out, then averaged over the images: one J per head. The paper shows its best
head; the line printed here, `jaccard: XX.X`, is the best head's mean J (the mean over heads is reported too).
Not in the paper, to read a J: the share of the attention on the object, beside the object's share of the
image, which is what attention that prefers nothing puts there.
Paper, PASCAL VOC12 val, ViT-S/16: 45.9 with DINO, 27.3 supervised.

Nothing in training asks for this: no mask, no label. On the embedded `scenes` (scenes.py: one object on
clutter, its shape is the class) the same measurement is made on a laptop, for a DINO run, the supervised
baseline (supervised.py) and the network at random init.

The paper gives no script for this table; the official visualize_attention.py gives the masks: the attention
normalised over the patches, sorted, and the patches kept whose cumulative mass from the smallest exceeds 1 - t,
which is the same set. Departures: any folder laid out as PASCAL VOC; images resized so that the shorter side
is --image_size and cropped to a multiple of the patch size (the ground truth resized with them, nearest).

Usage:
    python 10_segmentation.py --checkpoint runs/scenes/checkpoint.pth            # the embedded scenes, val split
    python 10_segmentation.py --random_init --arch vit_nano --patch_size 8 --image_size 64
    python 10_segmentation.py --pretrained dino_vits16 --data_path VOCdevkit/VOC2012 --image_size 480
    python 10_segmentation.py --checkpoint runs/scenes/checkpoint.pth --figure 6   # also segmentation.png
"""
import importlib
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

import checkpoint as ckpt
import cli
import data

multicrop = importlib.import_module("01_multicrop")
knn = importlib.import_module("06_knn")
attention = importlib.import_module("07_attention")
VOID = 255  # PASCAL VOC's label for object boundaries and ambiguous pixels: not scored


@torch.no_grad()
def attention_masks(model, images, patch_size, threshold=0.6):
    """Per image and head: the CLS attention maps (B, H, h/p, w/p) and their t-mass masks upsampled to pixels
    (B, H, h, w). `images` (B, 3, h, w), h and w multiples of the patch size."""
    model.eval()
    B, _, h, w = images.shape
    attn = model.get_last_selfattention(images)[:, :, 0, 1:].float()  # (B, H, N-1): the CLS query, patches only
    maps = (attn / attn.sum(-1, keepdim=True)).reshape(B, -1, h // patch_size, w // patch_size)  # (B, H, h/p, w/p)
    keep = attention.threshold_masks(maps.flatten(0, 1), threshold).reshape(maps.shape)
    return maps, F.interpolate(keep.float(), scale_factor=patch_size, mode="nearest").bool()  # (B, H, h, w)


def jaccard(pred, truth):
    """J(M, G) in % for each mask of `pred` (..., h, w) against `truth` (h, w) or broadcastable: 0 background,
    1 object, VOID left out. An image whose object and prediction are both empty scores 100."""
    valid = truth != VOID
    obj = (truth == 1) & valid
    inter = (pred & obj).sum((-2, -1)).float()
    union = ((pred & valid) | obj).sum((-2, -1)).float()
    return torch.where(union > 0, 100 * inter / union.clamp(min=1), torch.full_like(union, 100.0))


def object_share(maps, truth, patch_size):
    """Each head's share of attention on the object, (B, H): a patch counts by the part of it the object covers.
    A map that prefers nothing puts the object's area there; one that finds the object, more."""
    cover = F.avg_pool2d((truth == 1).float()[:, None], patch_size)  # (B, 1, h/p, w/p)
    return (maps * cover).sum((-2, -1))


@torch.no_grad()
def pca_rgb(model, images, patch_size):
    """The patch features of the last block projected on their first three principal components, fitted jointly
    over all the images given, each component scaled to [0, 1]: an RGB picture per image (B, h/p, w/p, 3).
    Parts that the network represents alike get alike colours, across images too."""
    model.eval()
    B, _, h, w = images.shape
    z = model.get_intermediate_layers(images, n=1)[0][:, 1:].float()  # (B, N-1, D): the patch tokens
    flat = z.flatten(0, 1)
    flat = flat - flat.mean(0)
    _, _, V = torch.linalg.svd(flat, full_matrices=False)
    pcs = flat @ V[:3].T  # (B (N-1), 3)
    pcs = (pcs - pcs.min(0).values) / (pcs.max(0).values - pcs.min(0).values).clamp(min=1e-6)
    return pcs.reshape(B, h // patch_size, w // patch_size, 3)


def summarize(J, share=None, area=None):
    """J (images, heads) -> the per-head means, the best head and its J, the mean over heads; with the attention's
    share on the object (images, heads) and the object's area (images,), their means in %."""
    per_head = J.mean(0)
    best = int(per_head.argmax())
    out = {"per_head": [round(float(j), 2) for j in per_head], "best_head": best,
           "jaccard_best_head": float(per_head[best]), "jaccard_mean_heads": float(per_head.mean()),
           "images": J.shape[0]}
    if share is not None:
        out.update(attention_on_object=100 * float(share.mean()), object_area=100 * float(area.mean()))
    return out


# ---------------------------------------------------------------------------- the data: scenes or PASCAL VOC
def scenes_split(split="val"):
    """The embedded scenes as (images (n, 3, s, s) normalised, truth (n, s, s) uint8 0/1, class names)."""
    import scenes
    ds = scenes.ScenesDataset(split)
    norm = transforms.Normalize(multicrop.IMAGENET_MEAN, multicrop.IMAGENET_STD)
    images = norm(torch.from_numpy(ds.images).permute(0, 3, 1, 2).float() / 255)
    return images, torch.from_numpy(ds.masks.astype(np.uint8)), [ds.classes[y] for y in ds.targets]


def voc_pairs(root, split="val"):
    """[(image path, mask path)] of a folder laid out as PASCAL VOC: JPEGImages/, SegmentationObject/ (or
    SegmentationClass/), and ImageSets/Segmentation/SPLIT.txt when present (else every mask)."""
    root = Path(root)
    masks = next((root / d for d in ("SegmentationObject", "SegmentationClass") if (root / d).is_dir()), None)
    if not (root / "JPEGImages").is_dir() or masks is None:
        raise data.DataError(f"{root} is not laid out as PASCAL VOC (JPEGImages/ and SegmentationObject/ or "
                             f"SegmentationClass/); pass the VOC2012 folder, or --data_path scenes")
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    names = listing.read_text().split() if listing.is_file() else sorted(p.stem for p in masks.glob("*.png"))
    if not names:
        raise data.DataError(f"{masks} has no .png masks (and {listing} lists none); nothing to score")
    pairs = []
    for name in names:
        image = next((p for p in (root / "JPEGImages" / f"{name}{e}" for e in (".jpg", ".jpeg", ".png")) if
                      p.is_file()), None)
        if image is None or not (masks / f"{name}.png").is_file():
            missing = f"JPEGImages/{name}.jpg" if image is None else f"{masks.name}/{name}.png"
            raise data.DataError(f"{root / missing} is missing ({name} is listed in {listing.name if listing.is_file() else masks.name}); "
                                 f"restore it or remove {name} from the list")
        pairs.append((image, masks / f"{name}.png"))
    for image, mask in pairs:  # the headers only: a wrong mask is found now, not after scoring the others
        try:
            with Image.open(image) as a, Image.open(mask) as b:
                sizes, mode = (a.size, b.size), b.mode
        except (OSError, ValueError) as e:
            raise data.DataError(f"cannot read {image} or {mask} ({e}); replace the file") from None
        if sizes[0] != sizes[1] or mode not in ("P", "L"):
            raise data.DataError(f"{mask} is {sizes[1][0]} x {sizes[1][1]} px ({mode}), its image {image.name} "
                                 f"{sizes[0][0]} x {sizes[0][1]}; masks must be single-channel palette PNGs of "
                                 f"their image's size")
    return pairs


def read_voc(image_path, mask_path, image_size, patch_size):
    """(image (1, 3, h, w) normalised, truth (h, w) uint8: 0 background, 1 any object, VOID) at the shorter side
    image_size, cropped to a multiple of the patch size."""
    image = data.open_image(image_path)
    try:
        with Image.open(mask_path) as m:
            labels = np.array(m)  # a palette PNG: the palette indices are the labels
    except (OSError, ValueError) as e:
        raise data.DataError(f"{mask_path} is not a readable PNG mask ({e}); replace it") from None
    if labels.ndim != 2 or labels.shape != (image.size[1], image.size[0]):
        raise data.DataError(f"{mask_path} is {labels.shape[1] if labels.ndim > 1 else '?'} x {labels.shape[0]} px, "
                             f"its image {image_path} {image.size[0]} x {image.size[1]}; masks must be single-channel "
                             f"palette PNGs of their image's size")
    truth = np.where(labels == VOID, VOID, labels > 0).astype(np.uint8)
    h_full, w_full = attention.resized_shape(image, image_size)
    h, w = h_full - h_full % patch_size, w_full - w_full % patch_size
    x = attention.image_tensor(image, image_size)[:, :h, :w]
    t = Image.fromarray(truth).resize((w_full, h_full), Image.NEAREST)
    return x[None], torch.from_numpy(np.array(t))[:h, :w]


def evaluate(model, patch_size, data_path="scenes", image_size=None, threshold=0.6, batch_size=64):
    """On the scenes' val split or a PASCAL VOC folder: J and the attention's share on the object per image and
    head, (n, H) each, and the object's share of each image, (n,)."""
    if data_path == "scenes":
        images, truth, _ = scenes_split("val")
        batches = zip(images.split(batch_size), truth.split(batch_size))
    else:
        pairs = (read_voc(image, mask, image_size, patch_size) for image, mask in voc_pairs(data_path))
        batches = ((x, t[None]) for x, t in pairs if (t == 1).any())  # an image without an object says nothing
    J, share, area = [], [], []
    for x, t in batches:
        maps, keep = attention_masks(model, x, patch_size, threshold)
        J.append(jaccard(keep, t[:, None]))
        share.append(object_share(maps, t, patch_size))
        area.append((t == 1).float().mean((-2, -1)))  # what a map that prefers nothing puts on the object
    if not J:
        raise data.DataError(f"no mask of {data_path} marks an object; nothing to score")
    return torch.cat(J), torch.cat(share), torch.cat(area)


def save_figure(models, images, truth, patch_size, path, threshold=0.6):
    """One row per image: the image, then for each (name, model) its best-matching head's attention and mask,
    then the ground truth."""
    from matplotlib.figure import Figure  # not pyplot: a notebook's inline figures stay as they are
    cols = 2 + 2 * len(models)
    fig = Figure(figsize=(1.6 * cols, 1.7 * len(images)))
    axes = fig.subplots(len(images), cols, squeeze=False)
    for r, (x, t) in enumerate(zip(images, truth)):
        axes[r, 0].imshow(multicrop.denormalize(x))
        for c, (name, model) in enumerate(models):
            maps, keep = attention_masks(model, x[None], patch_size, threshold)
            h = int(jaccard(keep[0], t).argmax())
            axes[r, 1 + 2 * c].imshow(maps[0, h], cmap="inferno")
            axes[r, 2 + 2 * c].imshow(keep[0, h], cmap="gray")
            axes[r, 2 + 2 * c].set_xlabel(f"J {float(jaccard(keep[0, h], t)):.0f}", fontsize=7)
            if r == 0:
                axes[r, 1 + 2 * c].set_title(f"{name}: attention", fontsize=8)
                axes[r, 2 + 2 * c].set_title(f"{int(100 * threshold)} % mask", fontsize=8)
        axes[r, -1].imshow(t, cmap="gray", vmin=0, vmax=1)
    axes[0, 0].set_title("image", fontsize=8), axes[0, -1].set_title("ground truth", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def get_args_parser():
    p = cli.Parser("Jaccard of the CLS attention's masks against ground-truth object masks")
    cli.add_backbone_args(p, knn.vits.ARCHS, raw_pixels=False)
    p.add_argument("--data_path", default="scenes", help="scenes (embedded, val split) or a PASCAL VOC folder")
    p.add_argument("--image_size", type=cli.positive_int, default=None,
                   help="shorter side in pixels for a VOC folder (default 480); the scenes are read at their own size")
    p.add_argument("--threshold", type=cli.fraction, default=0.6, help="t: the share of each head's attention kept")
    p.add_argument("--figure", type=cli.nonneg_int, default=0, metavar="N",
                   help="also save segmentation.png with N scenes: image, attention, mask, ground truth")
    p.add_argument("--output_dir", type=cli.directory, default=None, help=cli.output_dir_help("jaccard"))
    return p


def prepare(args):
    """Everything that can be wrong with the input, found before any work."""
    if args.data_path != "scenes":
        voc_pairs(args.data_path)
    elif args.figure > 64:
        raise cli.UsageError(f"--figure {args.figure}: at most 64 images fit in one figure")
    elif args.random_init and args.image_size is None:  # a network made for the scenes' size, as one trained on them
        import scenes
        args.image_size = scenes.SIZE
    model, image_size, out_dir = knn.build_backbone(args)
    cli.check_output_dir(out_dir)
    return model, out_dir


def main(args):
    torch.manual_seed(0)
    model, out_dir = prepare(args)
    image_size = args.image_size or 480
    res = summarize(*evaluate(model, args.patch_size, args.data_path, image_size, args.threshold))
    what = cli.source_name(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = cli.results_name(args, "jaccard")
    ckpt.save_json(dict(res, source=str(what), arch=args.arch, patch_size=args.patch_size, data_path=args.data_path,
                        threshold=args.threshold), out_dir / name)
    if args.figure and args.data_path == "scenes":
        images, truth, _ = scenes_split("val")
        save_figure([(Path(str(what)).parent.name or str(what), model)], images[:args.figure], truth[:args.figure],
                    args.patch_size, out_dir / "segmentation.png", args.threshold)
    print(f"{args.arch}/{args.patch_size} ({what}) on {args.data_path}, {res['images']} images, "
          f"{int(100 * args.threshold)} % of the attention: per head {res['per_head']}, "
          f"mean over heads {res['jaccard_mean_heads']:.1f}; attention on the object "
          f"{res['attention_on_object']:.1f} % (mean over heads), the object {res['object_area']:.1f} % of the image")
    print(f"jaccard: {res['jaccard_best_head']:.1f}")


if __name__ == "__main__":
    sys.exit(cli.run(main, get_args_parser().parse_args))
