"""Multi-crop augmentation (paper Sec. 3.1 "Multi-crop", Appendix on data augmentation;
Caron et al. 2020 for multi-crop, Grill et al. 2020 for the asymmetric BYOL recipe).

From one image, 2 global views (224 px, 40-100 % of the image) and N local views (96 px, 5-40 %).
The teacher sees only the global views, the student all of them, so the student must predict a
whole-image representation from a small part: "local-to-global" correspondence.

    shared:   horizontal flip 0.5, colour jitter (0.4, 0.4, 0.2, 0.1) w.p. 0.8, grayscale 0.2
    global 1: blur w.p. 1.0
    global 2: blur w.p. 0.1, solarize (threshold 128) w.p. 0.2
    local:    blur w.p. 0.5
    blur sigma ~ U[0.1, 2.0] px at 224 (global) / 96 (local) px; bicubic resized crops; ImageNet mean/std

Official defaults: global_crops_scale (0.4, 1), local_crops_scale (0.05, 0.4), 8 local crops.

Departures: crop sizes are parameters (32-64 px images for CPU runs), and the blur radius scales with
them, so a crop is blurred by the same fraction of its width as at the official sizes (a 2 px blur
on a 32 px crop is a 14 px blur at 224 px); all randomness, blur and
solarization included, comes from torch's generator, so torch.manual_seed fixes every crop (the
official blur and solarization draw from Python's `random`, which its seeding leaves out).

The same recipe split for speed, what train.py runs, is in multicrop_fast.py.
"""
import sys

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class GaussianBlur:
    def __init__(self, p=0.5, radius_min=0.1, radius_max=2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        if torch.rand(()) >= self.p:
            return img
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


class Solarization:
    """Invert every pixel value above 128, w.p. p (BYOL's asymmetric extra for the second view)."""

    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if torch.rand(()) < self.p else img


class DataAugmentationDINO:
    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=8,
                 global_size=224, local_size=96):
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ])
        normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        bicubic = transforms.InterpolationMode.BICUBIC

        def crop(size, scale):
            return transforms.RandomResizedCrop(size, scale=scale, interpolation=bicubic)

        def blur(p, size, official_size):  # sigma in [0.1, 2] px at the official size, in proportion otherwise
            scale = size / official_size
            return GaussianBlur(p, 0.1 * scale, 2.0 * scale)

        self.global_transfo1 = transforms.Compose([
            crop(global_size, global_crops_scale), flip_and_color_jitter, blur(1.0, global_size, 224), normalize])
        self.global_transfo2 = transforms.Compose([
            crop(global_size, global_crops_scale), flip_and_color_jitter, blur(0.1, global_size, 224),
            Solarization(0.2), normalize])
        self.local_crops_number = local_crops_number
        self.local_transfo = transforms.Compose([
            crop(local_size, local_crops_scale), flip_and_color_jitter, blur(0.5, local_size, 96), normalize])

    def __call__(self, image):
        image = image.convert("RGB")
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops += [self.local_transfo(image) for _ in range(self.local_crops_number)]
        return crops  # [g1, g2, l1, ..., lN], each (3, size, size)


def denormalize(x):
    """A normalised crop back to an image in [0, 1], (H, W, 3), for display."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1).permute(1, 2, 0)


def sample_image():
    """A photograph every matplotlib install ships, so the demos need no download."""
    from matplotlib import cbook
    return Image.open(cbook.get_sample_data("grace_hopper.jpg"))


if __name__ == "__main__":
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        image = Image.open(sys.argv[1]) if len(sys.argv) > 1 else sample_image()
    except OSError as e:  # missing, unreadable, or not an image
        sys.exit(f"error: cannot read {sys.argv[1]} as an image ({e.__class__.__name__}); give the path of an image")
    torch.manual_seed(0)
    crops = DataAugmentationDINO()(image)
    titles = ["global 1 (blur)", "global 2 (solarize p=.2)"] + [f"local {i + 1}" for i in range(len(crops) - 2)]
    fig, axes = plt.subplots(2, 6, figsize=(15, 5.5), gridspec_kw={"width_ratios": [2.3, 2.3, 1, 1, 1, 1]})
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(image.convert("RGB")), axes[0, 0].set_title("original")
    axes[1, 0].imshow(denormalize(crops[0])), axes[1, 0].set_title(titles[0])
    axes[1, 1].imshow(denormalize(crops[1])), axes[1, 1].set_title(titles[1])
    for i, (crop, title) in enumerate(zip(crops[2:], titles[2:])):
        ax = axes[i // 4, 2 + i % 4]
        ax.imshow(denormalize(crop)), ax.set_title(title)
    fig.tight_layout()
    fig.savefig("multicrop.png", dpi=80)
    print("crops:", ", ".join(f"{tuple(c.shape)}" for c in crops[:3]), f"... ({len(crops)} in all); saved multicrop.png")
