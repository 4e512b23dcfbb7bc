"""Self-attention maps of the CLS token (paper Sec. 4.2.1 and Fig. 1, 3; official visualize_attention.py).

    A^h = softmax(q_cls^h k^h^T / sqrt(d))[1:]           last block, head h, the CLS query over the patches
    a^h = A^h / sum A^h                                 renormalised over patches (the CLS's own share removed)
    M^h(t) = smallest set of patches with sum a^h >= t  the "threshold" view, t = 0.6 in Fig. 3

Nothing in DINO's training asks for segmentation, yet the last block's CLS attention separates
objects from background, each head attending to different parts.

Departures: the maps are renormalised over the patches (the official figure shows raw weights,
whose sum is 1 minus the CLS's attention to itself); the same smallest-set thresholding.

Usage:
    python 07_attention.py --checkpoint OUT/checkpoint.pth --image IMG --output_dir DIR [--threshold 0.6]
    python 07_attention.py --pretrained dino_vits8       # Fig. 1: the released ViT-S/8 on the bundled photograph
    python 07_attention.py --pretrained dino_deitsmall8_pretrain.pth --arch vit_small --patch_size 8 --image IMG
"""
import importlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import transforms

import cli
import data

multicrop = importlib.import_module("01_multicrop")
knn = importlib.import_module("06_knn")


def resized_shape(image, image_size):
    """(h, w): the shorter side at image_size, the longer at most twice that. Without the cap, a 4 x 1000 px
    image at 480 px becomes 480 x 120000 px, 900000 patches, and quadratic attention over them never ends."""
    w, h = image.size
    scale = min(image_size / min(w, h), 2 * image_size / max(w, h))
    return max(1, round(h * scale)), max(1, round(w * scale))


def image_tensor(image, image_size):
    """Resize (see resized_shape), normalise; attention_maps crops to a multiple of the patch size."""
    tf = transforms.Compose([
        transforms.Resize(resized_shape(image, image_size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(multicrop.IMAGENET_MEAN, multicrop.IMAGENET_STD),
    ])
    return tf(image.convert("RGB"))


@torch.no_grad()
def attention_maps(model, img, patch_size):
    """CLS-to-patch attention of the last block, per head: (H, h/p, w/p), each map summing to one.
    `img` is (3, h, w); it is cropped to a multiple of the patch size first."""
    h, w = img.shape[1] - img.shape[1] % patch_size, img.shape[2] - img.shape[2] % patch_size
    model.eval()
    attn = model.get_last_selfattention(img[None, :, :h, :w])  # (1, H, N, N)
    cls_to_patches = attn[0, :, 0, 1:]  # (H, N-1)
    maps = cls_to_patches / cls_to_patches.sum(dim=1, keepdim=True)
    return maps.reshape(-1, h // patch_size, w // patch_size)


def threshold_masks(maps, threshold=0.6):
    """Per head, the smallest set of patches whose attention adds up to at least `threshold`."""
    flat = maps.flatten(1)  # (H, n)
    # exercise attention: mask (H, n), True for the fewest patches of each head whose attention adds up to threshold
    val, idx = flat.sort(dim=1, descending=True)
    before = val.cumsum(dim=1) - val  # mass of the strictly larger patches
    keep_sorted = before < threshold  # a patch is kept while the mass before it is not yet enough
    mask = torch.zeros_like(keep_sorted).scatter(1, idx, keep_sorted)
    # end exercise
    return mask.reshape(maps.shape)


def upsample(maps, patch_size):
    return F.interpolate(maps[None].float(), scale_factor=patch_size, mode="nearest")[0]


def save_figure(img, maps, patch_size, path, threshold=None, title=""):
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is
    H = maps.shape[0]
    shown = multicrop.denormalize(img[:, :maps.shape[1] * patch_size, :maps.shape[2] * patch_size])
    up = upsample(maps, patch_size)
    masks = upsample(threshold_masks(maps, threshold), patch_size) if threshold else None
    fig = Figure(figsize=(2.2 * (H + 2), 2.6))
    axes = fig.subplots(1, H + 2)
    axes[0].imshow(shown), axes[0].set_title("image")
    for i in range(H):
        axes[i + 1].imshow(up[i], cmap="inferno"), axes[i + 1].set_title(f"head {i}")
        if masks is not None:
            axes[i + 1].contour(masks[i], levels=[0.5], colors="cyan", linewidths=0.8)
    axes[-1].imshow(up.mean(0), cmap="inferno"), axes[-1].set_title("mean of heads")
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return up, masks


def get_args_parser():
    p = cli.Parser("DINO self-attention maps")
    cli.add_backbone_args(p, knn.vits.ARCHS, patch=8, raw_pixels=False)
    p.add_argument("--image", default=None,
                   help="an image file; default: a photograph shipped with matplotlib; 'textures:N' for image N "
                        "of the embedded dataset's val split")
    p.add_argument("--image_size", type=cli.positive_int, default=None,
                   help="shorter side in pixels; default: a train.py checkpoint's global crop size, else 480")
    p.add_argument("--threshold", type=cli.fraction, default=None,
                   help="also outline the smallest set of patches holding this share of each head's attention")
    p.add_argument("--output_dir", type=cli.directory, default="attention")
    return p


def load_image(spec):
    """(image, what it is) for --image: None, textures:N or a file, decoded in full here."""
    if spec is None:
        return multicrop.sample_image(), "sample photograph"
    if spec.startswith("textures:"):
        n, size = spec[len("textures:"):], data.PER_CLASS["val"] * len(data.TEXTURES)
        if not (n.isascii() and n.isdigit() and len(n) <= len(str(size)) and int(n) < size):
            raise cli.UsageError(f"--image {spec!r}: expected textures:N with N from 0 to {size - 1} (an image of "
                                 f"the embedded val split)")
        ds = data.TexturesDataset("val", per_class=int(n) // len(data.TEXTURES) + 1)  # its first images only
        img, y = ds[int(n)]
        return img, f"textures val image {n} ({data.TEXTURES[y]})"
    return data.open_image(spec), spec


def prepare(args):
    """Everything that can be wrong with the input, found before any work: (model, image tensor, its name)."""
    cli.check_output_dir(args.output_dir)
    image, what = load_image(args.image)
    model, _, _ = knn.build_backbone(args)  # sets --image_size from a train.py checkpoint's crop size, if it has one
    image_size = args.image_size or 480
    h, w = resized_shape(image, image_size)
    grid = (h // args.patch_size, w // args.patch_size)
    if not 1 <= grid[0] * grid[1] <= cli.MAX_SIDE ** 2:
        raise cli.UsageError(f"{what} ({image.size[0]} x {image.size[1]} px) resized for --image_size {image_size} "
                             f"(the long side at most twice the short) is {w} x {h} px: {grid[1]} x {grid[0]} patches "
                             f"of {args.patch_size} px; choose an --image_size that gives 1 to {cli.MAX_SIDE ** 2} "
                             f"patches, or crop the image")
    return model, image_tensor(image, image_size), what


def main(args):
    model, img, what = prepare(args)
    maps = attention_maps(model, img, args.patch_size)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{args.arch}/{args.patch_size}, {what}, last block CLS attention"
    up, masks = save_figure(img, maps, args.patch_size, out_dir / "attention.png", args.threshold, title)
    import matplotlib.pyplot as plt
    for i in range(len(up)):
        plt.imsave(out_dir / f"attn-head{i}.png", up[i].numpy(), cmap="inferno")
    kept = "" if masks is None else f"; threshold {args.threshold}: {masks.flatten(1).mean(1).mul(100).round().tolist()}% of the image kept per head"
    print(f"{maps.shape[0]} heads, {maps.shape[1]}x{maps.shape[2]} patches; saved {out_dir / 'attention.png'}{kept}")


if __name__ == "__main__":
    sys.exit(cli.run(main, get_args_parser().parse_args))
