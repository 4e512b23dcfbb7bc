"""The multi-crop recipe of 01_multicrop.py, split for speed: the same distribution of crops, each half where
it is cheapest. This is what train.py runs; 01_multicrop.DataAugmentationDINO stays the readable reference and
what `--reference_mode` uses (tests/test_concepts.py checks that both draw from the same distribution).

    MultiCropGeometry, per image on the CPU (data-loading workers): decode, random resized crops, flips
        -> 2 + N uint8 crops (3, size, size); no colour operation, nothing in float.
    PhotometricAugmentation, per batch on the training device (in the workers on a CPU-only run): colour
        jitter (per-sample factors and per-sample random order of brightness, contrast, saturation, hue),
        grayscale, Gaussian blur (per-sample sigma), solarization, normalisation, with the probabilities
        and ranges of the reference; its draws are made per image in the workers, with the image's seed.

What differs from the PIL version (same distribution, different arithmetic):
    - colours are computed in float with no rounding to 8 bits between operations, with torchvision's
      tensor formulas (PIL's hue works on 8-bit HSV, so its hue steps are 1/256 of a turn);
    - the blur is a sampled Gaussian on a fixed (2 ceil(3 sigma_max) + 1)-tap kernel with reflected
      borders, torchvision's Gaussian (13 taps for sigma_max = 2 px: +-3 sigma at the largest sigma, and
      more for smaller ones), where PIL approximates the Gaussian by three box filters;
    - the crops are resampled by torch's antialiased bicubic on 8-bit tensors, PIL's filter in vectorised
      code (the two agree within 2 levels of 255); a JPEG is decoded at 1/2, 1/4 or 1/8 of its size (DCT
      scaling, PIL's draft) when even the smallest crop of the image keeps at least its output's pixels:
      a cheaper decode of large files, never a blurrier crop (at ImageNet's ~500 x 375 px it never applies);
    - the crop and flip draws come from a Python generator seeded from torch's, the photometric draws from
      torch's generator on the CPU (so the masks are known without a device sync): both stay fixed by
      torch.manual_seed.
"""
import importlib
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

multicrop = importlib.import_module("01_multicrop")  # the reference recipe: its ImageNet mean and std


# ---------------------------------------------------------------------------- half 1: per image, CPU
def random_resized_crop_box(W, H, scale, rng, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's sampling: area ~ U(scale) x W H and log aspect ratio ~ U(log ratio), up to 10
    tries for a box inside the image, else the whole image cut to the nearest allowed ratio. (left, top, w, h)."""
    for _ in range(10):
        area = W * H * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= W and 0 < h <= H:
            return rng.randint(0, W - w), rng.randint(0, H - h), w, h
    w, h = min(W, round(H * ratio[1])), min(H, round(W / ratio[0]))  # the central crop, ratio clamped to range
    return (W - w) // 2, (H - h) // 2, w, h


def load_pixels(image, reduction=1.0):
    """A PIL image as RGB uint8 (3, H, W). If it is a JPEG not decoded yet (just opened), it is decoded at
    1/2, 1/4 or 1/8 of its size (DCT scaling, PIL's draft) when `reduction` allows: a cheaper decode."""
    if reduction >= 2:  # a no-op for other formats and for decoded images
        image.draft("RGB", (math.ceil(image.width / reduction), math.ceil(image.height / reduction)))
    if image.mode != "RGB":  # grayscale, CMYK, palette
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W): decoded here


class MultiCropGeometry:
    """The per-image half of DataAugmentationDINO, for the data-loading workers: where each crop comes from
    and whether it is mirrored. Takes an image file's path (decoded here, at reduced size when that loses
    nothing) or a PIL image, and returns [g1, g2, l1..lN] as uint8 tensors (3, size, size). Colours are
    left to PhotometricAugmentation, which runs batched on the training device."""

    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=8,
                 global_size=224, local_size=96):
        self.views = [(global_size, global_crops_scale)] * 2 + [(local_size, local_crops_scale)] * local_crops_number

    def __call__(self, image):
        rng = random.Random(int(torch.randint(2 ** 62, ())))  # torch's generator seeds it: manual_seed fixes all
        opened = not isinstance(image, Image.Image)
        image = Image.open(image) if opened else image  # a file: only its header is read here
        if opened and image.getexif().get(0x0112, 1) != 1:  # EXIF orientation: a photo stored sideways
            image, opened = ImageOps.exif_transpose(image), False  # turned as images.open_image turns it
        W, H = image.size
        boxes = [random_resized_crop_box(W, H, scale, rng) for _, scale in self.views]
        # how much smaller the file can be decoded with every crop still keeping >= its output's pixels (an image
        # passed in is left as it is: a draft would change the caller's object)
        reduction = min(min(w, h) / size for (_, _, w, h), (size, _) in zip(boxes, self.views)) if opened else 1
        pixels = load_pixels(image, reduction)
        sx, sy = pixels.shape[2] / W, pixels.shape[1] / H  # 1, or the decoder's reduction
        crops = []
        for (left, top, w, h), (size, _) in zip(boxes, self.views):
            region = pixels[None, :, round(top * sy):round((top + h) * sy), round(left * sx):round((left + w) * sx)]
            # antialiased bicubic on 8-bit pixels: PIL's filter (a = -0.5) in torch's vectorised uint8 kernels
            crop = F.interpolate(region, (size, size), mode="bicubic", antialias=True)[0]  # (3, size, size) uint8
            crops.append(crop.flip(-1) if rng.random() < 0.5 else crop)
        return crops  # [g1, g2, l1, ..., lN]


# ---------------------------------------------------------------------------- half 2: per batch, device
# Batched versions of torchvision's tensor ops: x is (n, 3, H, W) in [0, 1], each factor is (n,), one per sample.
def blend(x, y, f):
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * y).clamp(0, 1)


def rgb_to_grayscale(x):
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)  # (n, 1, H, W), ITU-R 601 luma as torchvision


def adjust_brightness(x, f):
    return blend(x, torch.zeros_like(x), f)


def adjust_contrast(x, f):
    return blend(x, rgb_to_grayscale(x).mean((1, 2, 3), keepdim=True), f)  # towards the mean gray level


def adjust_saturation(x, f):
    return blend(x, rgb_to_grayscale(x), f)  # towards the image's own gray version


def adjust_hue(x, shift):
    """Rotate the hue by shift (in turns, [-0.5, 0.5]) at constant HSV saturation and value."""
    maxc, minc = x.amax(1), x.amin(1)  # (n, H, W): V = maxc, chroma V S = maxc - minc
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))  # gray pixels have no hue: keep them
    r, g, b = x.unbind(1)
    h6 = torch.where(maxc == r, ((g - b) / safe) % 6,  # hue in sixths of a turn, [0, 6)
                     torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h6 = (h6 + 6 * shift.view(-1, 1, 1)) % 6
    # back to RGB: channel n in (R, G, B) = (5, 3, 1) is V - V S clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6
    k = ((5 - 2 * torch.arange(3, device=x.device)).view(1, 3, 1, 1) + h6.unsqueeze(1)) % 6
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def gaussian_blur(x, sigma, kernel_size):
    """Separable Gaussian blur, one sigma per sample, reflected borders (as torchvision's gaussian_blur)."""
    n, C, H, W = x.shape
    half = kernel_size // 2
    t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)  # (n, k)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (n C, k): depthwise
    x = F.pad(x, (half, half, half, half), mode="reflect").view(1, n * C, H + 2 * half, W + 2 * half)
    x = F.conv2d(x, kernel.view(n * C, 1, 1, -1), groups=n * C)  # along the width
    x = F.conv2d(x, kernel.view(n * C, 1, -1, 1), groups=n * C)  # along the height
    return x.view(n, C, H, W)


def grayscale(x):
    return rgb_to_grayscale(x).repeat(1, 3, 1, 1)  # three equal channels, as RandomGrayscale


def solarize(x, threshold=128 / 255):
    return torch.where(x >= threshold, 1 - x, x)  # as PIL's ImageOps.solarize(img, 128) on 8-bit values


JITTER = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # ColorJitter's four, by index


def sample_photometric_params(p_blur, p_solarize, sigma_min, sigma_max, generator=None):
    """The photometric draws for n crops, one row each: p_blur, p_solarize, sigma_min, sigma_max are (n,),
    as they differ between g1, g2 and the local crops. Uniform ranges and probabilities of DataAugmentationDINO."""
    n = len(p_blur)

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    return {
        "jitter": torch.rand(n, generator=generator) < 0.8,  # RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], 0.8)
        "order": torch.rand(n, 4, generator=generator).argsort(1),  # (n, 4): a uniform random order of the four
        "factors": torch.stack([uniform(0.6, 1.4), uniform(0.6, 1.4), uniform(0.8, 1.2), uniform(-0.1, 0.1)], 1),
        "grayscale": torch.rand(n, generator=generator) < 0.2,
        "blur": torch.rand(n, generator=generator) < p_blur,
        "sigma": uniform(sigma_min, sigma_max),
        "solarize": torch.rand(n, generator=generator) < p_solarize,
    }


def apply_to(mask, x, fn, *args):
    """x with fn applied to the samples where mask (on the CPU, so no device sync) is set; args per sample."""
    idx = mask.nonzero().squeeze(1)
    args = [a[idx].to(x.device, non_blocking=True) for a in args]
    if len(idx) == len(x):
        return fn(x, *args)
    if len(idx):
        i = idx.to(x.device, non_blocking=True)
        x.index_copy_(0, i, fn(x.index_select(0, i), *args))
    return x


def apply_photometric(x, params, kernel_size, mean=multicrop.IMAGENET_MEAN, std=multicrop.IMAGENET_STD):
    """uint8 crops (n, 3, H, W) on any device -> augmented, normalised float crops, with the given draws."""
    x = x.float() / 255
    for step in range(4):  # each sample's own order of brightness, contrast, saturation, hue
        for j, op in enumerate(JITTER):
            x = apply_to(params["jitter"] & (params["order"][:, step] == j), x, op, params["factors"][:, j])
    x = apply_to(params["grayscale"], x, grayscale)
    x = apply_to(params["blur"], x, lambda y, sigma: gaussian_blur(y, sigma, kernel_size), params["sigma"])
    x = apply_to(params["solarize"], x, solarize)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1).to(x.device, non_blocking=True) for v in (mean, std))
    return (x - mean) / std


class PhotometricAugmentation:
    """The per-batch half of DataAugmentationDINO. `sample()` draws the parameters for one image's 2 + N crops
    (in the worker, with that image's seed); calling it on a batch, crops = V uint8 tensors (B, 3, size, size)
    and the collated draws (B, V, ...), applies them and returns the crops normalised, in the same order.
    Global crop 1 is blurred w.p. 1, global 2 w.p. 0.1 and solarized w.p. 0.2, each local crop blurred
    w.p. 0.5; sigma ~ U[0.1, 2] px at the official sizes, in proportion otherwise."""

    def __init__(self, local_crops_number=8, global_size=224, local_size=96):
        N = local_crops_number
        self.p_blur = torch.tensor([1.0, 0.1] + [0.5] * N)  # per view: g1, g2, l1..lN
        self.p_solarize = torch.tensor([0.0, 0.2] + [0.0] * N)
        self.px = torch.tensor([global_size / 224] * 2 + [local_size / 96] * N)  # sigma scales with the crop size
        # +-3 sigma at the largest sigma (13 taps at 224 / 96 px), at most what a reflected border allows
        self.kernel_size = [2 * min(math.ceil(3 * s), size - 1) + 1
                            for s, size in ((2.0 * global_size / 224, global_size), (2.0 * local_size / 96, local_size))]

    def sample(self, generator=None):
        return sample_photometric_params(self.p_blur, self.p_solarize, 0.1 * self.px, 2.0 * self.px, generator)

    def __call__(self, crops, params):
        out = []
        for views, kernel_size in ((slice(0, 2), self.kernel_size[0]), (slice(2, None), self.kernel_size[1])):
            x = crops[views]
            if x:  # one pass per resolution: the views' rows in the order of torch.cat(x), view after view
                rows = {k: v[:, views].transpose(0, 1).flatten(0, 1) for k, v in params.items()}
                out += apply_photometric(torch.cat(x), rows, kernel_size).chunk(len(x))
        return out  # [g1, g2, l1, ..., lN], each (B, 3, size, size) float


class DataAugmentationDINOSplit:
    """DataAugmentationDINO's recipe in its two halves. Called on an image (in a data-loading worker): the
    uint8 crops [g1, g2, l1..lN] and the photometric draws for them; `.photometric(crops, params)` then
    applies the draws to a collated batch, on whatever device the batch is."""

    def __init__(self, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), local_crops_number=8,
                 global_size=224, local_size=96):
        self.geometry = MultiCropGeometry(global_crops_scale, local_crops_scale, local_crops_number,
                                          global_size, local_size)
        self.photometric = PhotometricAugmentation(local_crops_number, global_size, local_size)

    def __call__(self, image):
        return self.geometry(image), self.photometric.sample()
