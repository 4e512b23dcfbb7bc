"""The paper's claims about each concept, stated as tests."""
import itertools
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torch.utils.data import default_collate
from torchvision import transforms

from conftest import load

multicrop, vit_mod, head_mod, loss_mod, ema_mod = (load(n) for n in
                                                    ("01_multicrop", "02_vit", "03_head", "04_loss", "05_teacher_ema"))
fast = load("multicrop_fast")


# ---------------------------------------------------------------- 01 multi-crop
def test_multicrop_shapes_and_order():
    aug = multicrop.DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 6, global_size=32, local_size=16)
    crops = aug(Image.new("RGB", (50, 40), (120, 30, 200)))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 6


def three_draws(aug):
    """aug on the sample photograph with torch's seed 3, 3 again (Python's `random` seeded otherwise) and 4."""
    img = multicrop.sample_image()
    torch.manual_seed(3); random.seed(1)
    a = aug(img)
    torch.manual_seed(3); random.seed(2)
    b = aug(img)
    torch.manual_seed(4)
    return a, b, aug(img)


def test_same_seed_same_crops_even_with_python_random_disturbed():
    a, b, c = three_draws(multicrop.DataAugmentationDINO(local_crops_number=2, global_size=48, local_size=24))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_asymmetric_blur_and_solarization_probabilities():
    aug = multicrop.DataAugmentationDINO()
    assert aug.global_transfo1.transforms[2].p == 1.0
    assert aug.global_transfo2.transforms[2].p == 0.1
    assert aug.local_transfo.transforms[2].p == 0.5
    assert [type(t).__name__ for t in aug.global_transfo2.transforms].count("Solarization") == 1
    assert "Solarization" not in [type(t).__name__ for t in aug.global_transfo1.transforms + aug.local_transfo.transforms]
    assert aug.global_transfo2.transforms[3].p == 0.2


def test_blur_radius_scales_with_crop_size():
    official, small = multicrop.DataAugmentationDINO(), multicrop.DataAugmentationDINO(global_size=32, local_size=16)
    g, l = official.global_transfo1.transforms[2], official.local_transfo.transforms[2]
    assert (g.radius_min, g.radius_max) == (l.radius_min, l.radius_max) == (0.1, 2.0)  # the official values
    g, l = small.global_transfo1.transforms[2], small.local_transfo.transforms[2]
    assert g.radius_max == pytest.approx(2.0 * 32 / 224) and l.radius_max == pytest.approx(2.0 * 16 / 96)


def test_solarization_inverts_above_128():
    img = Image.fromarray(np.array([[[10, 200, 128]]], dtype=np.uint8))
    torch.manual_seed(0)
    out = np.array(multicrop.Solarization(p=1.0)(img))
    assert out.tolist() == [[[10, 55, 127]]]



# ---------------------------------------------------------------- 01 multi-crop, split: uint8 crops + batched colours
def photo(w=48, h=40):
    return multicrop.sample_image().convert("RGB").resize((w, h))


def test_batched_colour_ops_match_torchvision_per_sample():
    x = torch.cat([TF.to_tensor(photo())[None], torch.rand(3, 3, 40, 48), torch.full((1, 3, 40, 48), 0.5)])
    ops = [(fast.adjust_brightness, TF.adjust_brightness, (0.6, 1.0, 1.4)),
           (fast.adjust_contrast, TF.adjust_contrast, (0.6, 1.0, 1.4)),
           (fast.adjust_saturation, TF.adjust_saturation, (0.8, 1.0, 1.2)),
           (fast.adjust_hue, TF.adjust_hue, (-0.1, 0.0, 0.1, -0.5, 0.5))]
    for ours, theirs, values in ops:
        f = torch.tensor(values)[torch.arange(len(x)) % len(values)]  # a different factor per sample
        ref = torch.stack([theirs(xi, fi.item()) for xi, fi in zip(x, f)])
        assert (ours(x, f) - ref).abs().max() < 1e-5, ours.__name__
    assert torch.equal(fast.grayscale(x), TF.rgb_to_grayscale(x, num_output_channels=3))
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0, 0.4])
    ref = torch.stack([TF.gaussian_blur(xi, [13, 13], [s.item()] * 2) for xi, s in zip(x, sigma)])
    assert (fast.gaussian_blur(x, sigma, 13) - ref).abs().max() < 1e-5
    assert torch.equal(fast.solarize(x), TF.solarize(x, 128 / 255))
    levels = torch.arange(256, dtype=torch.uint8)  # on 8-bit values exactly PIL's solarize, as in DataAugmentationDINO
    pil = np.array(ImageOps.solarize(Image.fromarray(levels.numpy()[None].repeat(3, 0)), 128))[0]
    assert torch.equal((fast.solarize(levels / 255) * 255).round().byte(), torch.from_numpy(pil))


def fixed_draws():
    """Three crops: jitter in two different orders, jitter off; grayscale, blur and solarize on some."""
    return {"jitter": torch.tensor([True, True, False]),
            "order": torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 3, 2]]),
            "factors": torch.tensor([[1.3, 0.7, 1.2, 0.08], [0.65, 1.35, 0.85, -0.1], [1.4, 1.4, 1.2, 0.1]]),
            "grayscale": torch.tensor([False, True, False]), "blur": torch.tensor([True, False, True]),
            "sigma": torch.tensor([1.5, 1.0, 0.3]), "solarize": torch.tensor([False, True, True])}


def test_fixed_draws_give_torchvisions_composition_and_pils_within_rounding():
    img = photo()
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].repeat(3, 1, 1, 1)  # (3, 3, 40, 48) uint8
    p = fixed_draws()
    out = fast.apply_photometric(x, p, kernel_size=13)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    std = torch.tensor(multicrop.IMAGENET_STD).view(3, 1, 1)
    for s in range(3):
        for pil in (False, True):  # torchvision's tensor ops (exact), and the PIL chain DataAugmentationDINO runs
            y = img if pil else TF.to_tensor(img)
            for j in p["order"][s] if p["jitter"][s] else []:
                y = ops[j](y, p["factors"][s, j].item())
            y = TF.rgb_to_grayscale(y, 3) if p["grayscale"][s] else y
            if p["blur"][s] and not pil:  # PIL's blur is a different approximation of the Gaussian (see docstring)
                y = TF.gaussian_blur(y, [13, 13], [p["sigma"][s].item()] * 2)
            if p["solarize"][s]:
                y = ImageOps.solarize(y, 128) if pil else TF.solarize(y, 128 / 255)
            ref = TF.normalize(TF.to_tensor(y) if pil else y, multicrop.IMAGENET_MEAN, multicrop.IMAGENET_STD)
            diff = (out[s] - ref).abs() * std * 255  # in 8-bit levels
            if not pil:
                assert diff.max() < 1e-3, s
            elif not p["blur"][s]:  # PIL rounds to 8 bits after every op, and its hue works in 8-bit HSV
                assert diff.mean() < 2.5, (s, diff.mean())


def test_photometric_draws_have_the_papers_probabilities_and_ranges():
    aug = fast.PhotometricAugmentation(local_crops_number=2, global_size=32, local_size=16)
    g = torch.Generator().manual_seed(0)
    n = 4000
    p = default_collate([aug.sample(g) for _ in range(n)])  # (n, 4 views: g1, g2, l1, l2)

    def close(freq, prob):  # within 5 binomial standard deviations
        return abs(freq - prob) <= 5 * math.sqrt(prob * (1 - prob) / n) + 1e-9

    for view, (blur, solarize) in enumerate([(1.0, 0.0), (0.1, 0.2), (0.5, 0.0), (0.5, 0.0)]):
        assert close(p["jitter"][:, view].float().mean().item(), 0.8)
        assert close(p["grayscale"][:, view].float().mean().item(), 0.2)
        assert close(p["blur"][:, view].float().mean().item(), blur), view
        assert close(p["solarize"][:, view].float().mean().item(), solarize), view  # second global view only
    f = p["factors"]
    for j, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):  # ColorJitter(0.4, 0.4, 0.2, 0.1)
        assert lo <= f[..., j].min() and f[..., j].max() <= hi and abs(f[..., j].mean() - (lo + hi) / 2) < 0.01 * (hi - lo)
    for view, size in enumerate([32, 32, 16, 16]):  # sigma ~ U[0.1, 2] px at 224 / 96 px, in proportion here
        official = 224 if view < 2 else 96
        s = p["sigma"][:, view] * official / size
        assert 0.1 <= s.min() < 0.15 and 1.95 < s.max() <= 2.0
    orders = [tuple(o) for o in p["order"].reshape(-1, 4).tolist()]
    counts = [orders.count(perm) for perm in itertools.permutations(range(4))]
    assert all(abs(c / len(orders) - 1 / 24) < 0.01 for c in counts)  # each of the 24 orders equally likely
    assert fast.PhotometricAugmentation().kernel_size == [13, 13]  # +-3 sigma_max at the official sizes


def test_split_recipe_crops_order_dtype_and_normalised_range():
    aug = fast.DataAugmentationDINOSplit((0.4, 1.0), (0.05, 0.4), 6, global_size=32, local_size=16)
    samples = [aug(Image.new("RGB", (50, 40), (120, 30, 200))) for _ in range(3)]
    assert [(tuple(c.shape), c.dtype) for c in samples[0][0]] == \
        [((3, 32, 32), torch.uint8)] * 2 + [((3, 16, 16), torch.uint8)] * 6
    crops, params = default_collate(samples)
    out = aug.photometric(crops, params)
    assert [tuple(c.shape) for c in out] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 6  # [g1, g2, l1..l6]
    mean, std = torch.tensor(multicrop.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(multicrop.IMAGENET_STD).view(3, 1, 1)
    for c in out:  # pixels in [0, 1], normalised with ImageNet's mean and std
        assert ((c * std + mean).amin() >= -1e-6) and ((c * std + mean).amax() <= 1 + 1e-6)
    official = fast.DataAugmentationDINOSplit()(photo(500, 375))[0]
    assert [tuple(c.shape) for c in official] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 8


def test_split_recipe_is_seeded_and_a_crop_does_not_depend_on_its_batch():
    aug = fast.DataAugmentationDINOSplit(local_crops_number=2, global_size=48, local_size=24)
    a, b, c = three_draws(aug)
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert not torch.equal(a[0][0], c[0][0])
    batch = aug.photometric(*default_collate([a, c, b]))
    alone = aug.photometric(*default_collate([c]))
    assert all(torch.allclose(x[1], y[0], atol=1e-6) for x, y in zip(batch, alone))
    assert all(torch.equal(x[0], x[2]) for x in batch)


def test_geometry_resamples_like_pil_bicubic_and_flips_half_the_time():
    img = photo(60, 30)  # aspect 2 at scale (1, 1): no box fits, so every crop is torchvision's central fallback
    box = fast.random_resized_crop_box(60, 30, (1.0, 1.0), random.Random(0))
    i, j, h, w = transforms.RandomResizedCrop.get_params(img, (1.0, 1.0), (3 / 4, 4 / 3))
    assert box == (j, i, w, h) == (10, 0, 40, 30)
    geometry = fast.MultiCropGeometry((1.0, 1.0), (1.0, 1.0), 0, global_size=32)
    pil = img.crop((10, 0, 50, 30)).resize((32, 32), Image.BICUBIC)
    pil = torch.from_numpy(np.array(pil)).permute(2, 0, 1).int()
    torch.manual_seed(0)
    flipped = []
    for _ in range(100):
        for crop in geometry(img):
            d, d_flip = (crop.int() - pil).abs().max(), (crop.flip(-1).int() - pil).abs().max()
            assert min(d, d_flip) <= 2  # PIL's bicubic filter, up to rounding
            flipped.append(bool(d_flip < d))
    assert abs(np.mean(flipped) - 0.5) < 0.1


def test_crop_boxes_follow_random_resized_crop():
    rng, n = random.Random(0), 4000
    ours = [fast.random_resized_crop_box(500, 375, (0.05, 0.4), rng) for _ in range(n)]
    area = np.array([w * h for _, _, w, h in ours]) / (500 * 375)
    aspect = np.array([w / h for _, _, w, h in ours])
    assert area.min() > 0.045 and area.max() < 0.41 and aspect.min() > 0.74 and aspect.max() < 1.35
    assert all(0 <= x and x + w <= 500 and 0 <= y and y + h <= 375 for x, y, w, h in ours)
    torch.manual_seed(0)
    theirs = [transforms.RandomResizedCrop.get_params(torch.empty(3, 375, 500), (0.05, 0.4), (3 / 4, 4 / 3))
              for _ in range(n)]
    their_area = np.array([w * h for _, _, h, w in theirs]) / (500 * 375)
    assert abs(area.mean() - their_area.mean()) < 0.006 and abs(np.log(aspect).mean()) < 0.01


def test_reduced_size_decoding_only_when_every_crop_keeps_its_pixels(tmp_path, monkeypatch):
    photo(1600, 1200).save(tmp_path / "big.jpg", quality=90)
    photo(500, 375).save(tmp_path / "imagenet_size.jpg", quality=90)
    assert tuple(fast.load_pixels(Image.open(tmp_path / "big.jpg"), 2.5).shape) == (3, 600, 800)  # DCT / 2
    assert tuple(fast.load_pixels(Image.open(tmp_path / "big.jpg"), 1.9).shape) == (3, 1200, 1600)
    geometry = fast.MultiCropGeometry((0.4, 1.0), (0.3, 0.4), 2, 224, 96)
    torch.manual_seed(0)
    crops = geometry(tmp_path / "big.jpg")
    torch.manual_seed(0)  # the same boxes on the fully decoded image: crops differ only by the decoder's scaling
    full = geometry(Image.open(tmp_path / "big.jpg").convert("RGB"))
    assert all((a.float() - b.float()).abs().mean() < 3 for a, b in zip(crops, full))
    reductions = []
    monkeypatch.setattr(fast, "load_pixels", lambda img, r: reductions.append(r) or torch.zeros(3, 375, 500,
                                                                                                      dtype=torch.uint8))
    for seed in range(20):
        torch.manual_seed(seed)
        geometry(tmp_path / "big.jpg")
        geometry(tmp_path / "imagenet_size.jpg")
    assert min(reductions[0::2]) >= 2  # 1600 x 1200: every crop here could be cut from a half-size decode
    assert max(reductions[1::2]) < 2  # the global crops need every pixel of an ImageNet-size image


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical distribution functions."""
    a, b, grid = np.sort(a), np.sort(b), np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()


def same_distribution(ours, theirs, alpha=1e-4):
    """Whether two samples may come from one distribution: the KS statistic within its 1 - alpha quantile."""
    n, m = len(ours), len(theirs)
    return ks_distance(ours, theirs) <= math.sqrt(-math.log(alpha / 2) / 2 * (n + m) / (n * m))


def test_split_recipe_cuts_the_same_crops_as_the_reference():
    """Both recipes with their default scales, on an image whose pixels hold their own coordinates (red = x,
    green = y): where each crop lies, how large, how elongated, and whether mirrored, seed after seed."""
    W, H, n = 256, 192, 2000
    x, y = np.meshgrid(np.arange(W), np.arange(H))
    coords = Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))
    reference = multicrop.DataAugmentationDINO(local_crops_number=1, global_size=32, local_size=16)
    geometry = fast.DataAugmentationDINOSplit(local_crops_number=1, global_size=32, local_size=16).geometry
    # each view's own resized crop and flip, without its colour operations
    views = [transforms.Compose(t.transforms[:1] + t.transforms[1].transforms[:1])
             for t in (reference.global_transfo1, reference.global_transfo2, reference.local_transfo)]

    def borders(crop):  # (left, right, top, bottom): the coordinates along the crop's borders
        c = np.asarray(crop, dtype=np.float64) if isinstance(crop, Image.Image) else crop.permute(1, 2, 0).double().numpy()
        return c[:, 0, 0].mean(), c[:, -1, 0].mean(), c[0, :, 1].mean(), c[-1, :, 1].mean()

    theirs, ours = [], []
    for seed in range(n):
        torch.default_generator.manual_seed(seed)  # as torch.manual_seed, for the CPU only: cheaper
        theirs.append([borders(view(coords)) for view in views])
        torch.default_generator.manual_seed(seed)
        ours.append([borders(crop) for crop in geometry(coords)])
    for view in range(3):
        stats = []
        for b in (np.array(theirs)[:, view], np.array(ours)[:, view]):  # (n, 4)
            width, height = np.abs(b[:, 1] - b[:, 0]), b[:, 3] - b[:, 2]
            stats.append({"area": width * height / (W * H), "aspect": np.log(width / height),
                          "centre x": (b[:, 0] + b[:, 1]) / 2, "centre y": (b[:, 2] + b[:, 3]) / 2,
                          "mirrored": (b[:, 1] < b[:, 0]).astype(float)})
        for k in stats[0]:
            assert same_distribution(stats[1][k], stats[0][k]), (view, k)


def test_split_recipe_colours_a_fixed_image_as_the_reference_does():
    """Both recipes on one fixed image, whole (scale 1) and in horizontal bands (white, black, a colour, gray),
    so that a flip changes nothing and only the photometric draws vary. Per view, seed after seed: how often a
    crop is gray and how often solarized (nothing above half the range is left), the white band's mean level,
    and the colour band's chroma and hue. The two blurs are different approximations of one Gaussian
    (multicrop_fast's docstring), and PIL rounds to 8 bits after every operation: what is compared here is
    what neither changes."""
    bands = [(255, 255, 255)] * 8 + [(0, 0, 0)] * 8 + [(200, 60, 40)] * 8 + [(128, 128, 128)] * 8
    img = Image.fromarray(np.array(bands, np.uint8)[:, None].repeat(32, 1))  # (32, 32, 3)
    n, kw = 2000, dict(global_crops_scale=(1.0, 1.0), local_crops_scale=(1.0, 1.0), local_crops_number=1,
                       global_size=32, local_size=16)
    reference, split = multicrop.DataAugmentationDINO(**kw), fast.DataAugmentationDINOSplit(**kw)
    theirs, samples = [], []
    for seed in range(n):
        torch.default_generator.manual_seed(seed)
        theirs.append(reference(img))
        torch.default_generator.manual_seed(seed)
        samples.append(split(img))
    ours = split.photometric(*default_collate(samples))  # [g1, g2, l1], each (n, 3, s, s)
    mean, std = torch.tensor(multicrop.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(multicrop.IMAGENET_STD).view(3, 1, 1)

    def z(a, b):  # the difference of two means in standard errors
        return (a.mean() - b.mean()) / math.sqrt(a.var() / len(a) + b.var() / len(b) + 1e-12)

    for view, size in enumerate((32, 32, 16)):
        stats = []
        for crops in (torch.stack([t[view] for t in theirs]), ours[view]):
            x = (crops * std + mean).clamp(0, 1)  # (n, 3, s, s) in [0, 1]
            white, _, colour, _ = (x[:, :, k * size // 4 + 1:(k + 1) * size // 4 - 1].mean((2, 3)) for k in range(4))
            stats.append({"gray": ((x.amax(1) - x.amin(1)).amax((1, 2)) < 2 / 255).double(),
                          "solarized": (x.amax((1, 2, 3)) <= 0.5 + 1 / 255).double(),
                          "white": white.mean(1).double(), "chroma": colour.amax(1) - colour.amin(1),
                          "hue": colour[:, 0] - colour[:, 1]})  # red against green: the hue shift's sign
        theirs_, ours_ = stats
        for k in ("gray", "solarized", "white"):
            assert abs(z(ours_[k], theirs_[k])) < 4, (view, k)
        for k in ("chroma", "hue"):
            assert same_distribution(ours_[k].numpy(), theirs_[k].numpy()), (view, k)


# ---------------------------------------------------------------- 02 ViT
@pytest.mark.parametrize("arch,dim", [("vit_tiny", 192), ("vit_small", 384), ("vit_base", 768)])
def test_vit_archs_widths(arch, dim):
    m = vit_mod.ARCHS[arch](patch_size=16)
    assert m.embed_dim == dim and len(m.blocks) == 12
    assert m.blocks[0].attn.num_heads == {"vit_tiny": 3, "vit_small": 6, "vit_base": 12}[arch]


@pytest.mark.parametrize("patch", [16, 8, 4])
@pytest.mark.parametrize("hw", [(64, 64), (32, 32), (48, 80)])
def test_vit_shapes_any_patch_and_size(patch, hw):
    m = vit_mod.VisionTransformer(img_size=64, patch_size=patch, embed_dim=48, depth=2, num_heads=3).eval()
    x = torch.randn(2, 3, *hw)
    assert m(x).shape == (2, 48)
    n = 1 + (hw[0] // patch) * (hw[1] // patch)
    assert m.get_last_selfattention(x).shape == (2, 3, n, n)
    inter = m.get_intermediate_layers(x, n=2)
    assert len(inter) == 2 and inter[-1].shape == (2, n, 48)
    assert torch.allclose(inter[-1][:, 0], m(x), atol=1e-6)


def test_vit_small_on_96px_local_crops():
    m = vit_mod.vit_small(patch_size=16).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 96, 96)).shape == (1, 384)


def test_sdpa_equals_explicit_attention():
    torch.manual_seed(0)
    m = vit_mod.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=4,
                                  qkv_bias=True).eval()
    blk, x = m.blocks[0], m.prepare_tokens(torch.randn(2, 3, 32, 40))
    # softmax(q k^T / sqrt(d)) v, computed here from the weights, independently of the module's code
    q, k, v = blk.attn.qkv(blk.norm1(x)).reshape(2, x.shape[1], 3, 4, 12).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1) / math.sqrt(12)).softmax(dim=-1)
    explicit = blk.attn.proj((attn @ v).transpose(1, 2).reshape(2, x.shape[1], 48))
    assert torch.allclose(blk(x, return_attention=True), attn, atol=1e-6)
    assert torch.allclose(blk.attn(blk.norm1(x)), explicit, atol=1e-5)  # fused (SDPA)
    blk.attn.fused = False
    assert torch.allclose(blk.attn(blk.norm1(x)), explicit, atol=1e-6)  # the official explicit computation


def test_pos_embed_interpolation_is_identity_at_training_size_and_bicubic_elsewhere():
    m = vit_mod.VisionTransformer(img_size=64, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    assert m.interpolate_pos_encoding(64, 64, 64) is m.pos_embed
    out = m.interpolate_pos_encoding(12, 24, 32)  # 3 x 4 patch grid
    grid = m.pos_embed[:, 1:].reshape(1, 8, 8, 16).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=(3.1 / 8, 4.1 / 8), mode="bicubic")
    assert out.shape == (1, 13, 16)
    assert torch.allclose(out[:, 1:], ref.flatten(2).transpose(1, 2))
    assert torch.equal(out[:, 0], m.pos_embed[:, 0])


@pytest.mark.parametrize("hw", [(32, 32), (36, 44)])
def test_patch_embedding_as_matmul_equals_the_convolution(hw):
    pe = vit_mod.PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16)
    x = torch.randn(2, 3, *hw)
    fast = pe(x)
    pe.fused = False
    assert fast.shape == (2, (hw[0] // 8) * (hw[1] // 8), 16)
    assert torch.allclose(fast, pe(x), atol=1e-5)


def test_vit_state_dict_keys_are_official():
    keys = set(vit_mod.vit_small(patch_size=16).state_dict())
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(12):
        for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            expected |= {f"blocks.{i}.{sub}.weight", f"blocks.{i}.{sub}.bias"}
    assert keys == expected
    assert vit_mod.vit_small(patch_size=16).pos_embed.shape == (1, 197, 384)


def test_drop_path_linear_schedule_and_eval_identity():
    m = vit_mod.VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=5, num_heads=2, drop_path_rate=0.4)
    assert [round(b.drop_path.drop_prob, 6) for b in m.blocks] == [0.0, 0.1, 0.2, 0.3, 0.4]
    x = torch.randn(64, 4, 8)
    assert torch.equal(vit_mod.drop_path(x, 0.4, training=False), x)
    torch.manual_seed(0)
    y = vit_mod.drop_path(x, 0.5, training=True)
    kept = (y.abs().sum(dim=(1, 2)) > 0)
    assert torch.allclose(y[kept], x[kept] * 2) and 10 < kept.sum() < 54


# ---------------------------------------------------------------- 03 head
def test_head_keys_and_unit_prototypes():
    head = head_mod.DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16)
    assert list(head.state_dict()) == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight",
                                       "mlp.4.bias", "last_layer.weight_v", "last_layer.weight_g"]
    assert head.last_layer.weight_g.shape == (100, 1) and not head.last_layer.weight_g.requires_grad
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(100), atol=1e-6)
    out = head(torch.randn(5, 32))
    assert out.shape == (5, 100) and out.abs().max() <= 1 + 1e-6
    assert head_mod.DINOHead(32, 100, norm_last_layer=False).last_layer.weight_g.requires_grad
    assert list(head_mod.DINOHead(32, 100, nlayers=1, bottleneck_dim=16).state_dict())[:2] == ["mlp.weight", "mlp.bias"]


def test_head_weight_norm_matches_torch_reference():
    head = head_mod.DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    with torch.no_grad():
        head.last_layer.weight_g.mul_(torch.rand(10, 1) + 0.5)
    g, v = head.last_layer.weight_g, head.last_layer.weight_v
    assert torch.allclose(head.last_layer.weight, torch._weight_norm(v, g, 0))


def test_head_with_batchnorm_and_gradients_reach_v():
    head = head_mod.DINOHead(8, 10, use_bn=True, hidden_dim=16, bottleneck_dim=4)
    assert isinstance(head.mlp[1], torch.nn.BatchNorm1d)
    head(torch.randn(4, 8)).sum().backward()
    assert head.last_layer.weight_v.grad is not None and head.last_layer.weight_g.grad is None


def test_multicrop_wrapper_one_backbone_pass_per_resolution():
    backbone = vit_mod.VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    calls = []
    backbone.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    model = head_mod.MultiCropWrapper(backbone, head_mod.DINOHead(16, 20, hidden_dim=8, bottleneck_dim=4)).eval()
    crops = [torch.randn(3, 3, 32, 32)] * 2 + [torch.randn(3, 3, 16, 16) for _ in range(4)]
    out = model(crops)
    assert out.shape == (18, 20) and calls == [6, 12]
    # rows come view by view: the 3rd local crop's batch is rows 12..14
    assert torch.allclose(out[12:15], model.head(backbone(crops[4])), atol=1e-6)


# ---------------------------------------------------------------- 04 loss
def official_formula(student, teacher, center, ncrops, tau_s, tau_t):
    """The loss written term by term from Eq. 1 and Algorithm 1."""
    s = [F.log_softmax(x / tau_s, dim=-1) for x in student.chunk(ncrops)]
    t = [F.softmax((x - center) / tau_t, dim=-1) for x in teacher.chunk(2)]
    terms = [(-t[i] * s[v]).sum(-1).mean() for i in range(2) for v in range(ncrops) if v != i]
    return sum(terms) / len(terms), len(terms)


def test_loss_equals_formula_and_counts_2_v_minus_1_terms():
    torch.manual_seed(0)
    ncrops, B, K = 5, 3, 16
    loss_fn = loss_mod.DINOLoss(K, ncrops, 0.04, 0.07, 3, 10)
    loss_fn.center.copy_(torch.randn(1, K))
    student, teacher = torch.randn(ncrops * B, K), torch.randn(2 * B, K)
    expected, n = official_formula(student, teacher, loss_fn.center.clone(), ncrops, 0.1, 0.04)
    assert n == 2 * (ncrops - 1)
    assert torch.allclose(loss_fn(student, teacher, epoch=0), expected, atol=1e-6)


def test_loss_skips_same_view_pairs():
    torch.manual_seed(0)
    B, K = 4, 8
    loss_fn = loss_mod.DINOLoss(K, 3, 0.04, 0.04, 0, 1)
    student, teacher = torch.randn(3 * B, K), torch.randn(2 * B, K)
    base = loss_fn(student.clone(), teacher, 0)
    loss_fn.center.zero_()
    # changing what the student says about view 1 changes the loss only through pair (teacher 0, student 1)
    s2 = student.clone()
    s2[B:2 * B] = torch.randn(B, K)
    diff = loss_fn(s2, teacher, 0) - base
    loss_fn.center.zero_()
    tq = F.softmax(teacher[:B] / 0.04, -1)
    pair = lambda s: (-tq * F.log_softmax(s[B:2 * B] / 0.1, -1)).sum(-1).mean()
    assert torch.allclose(diff, (pair(s2) - pair(student)) / 4, atol=1e-5)


def test_teacher_gets_no_gradient():
    loss_fn = loss_mod.DINOLoss(8, 4, 0.04, 0.04, 0, 1)
    student = torch.randn(16, 8, requires_grad=True)
    teacher = torch.randn(8, 8, requires_grad=True)
    loss_fn(student, teacher, 0).backward()
    assert student.grad is not None and teacher.grad is None


def test_centering_formula_and_switches():
    torch.manual_seed(0)
    loss_fn = loss_mod.DINOLoss(6, 2, 0.04, 0.04, 0, 1, center_momentum=0.9)
    c0 = torch.randn(1, 6)
    loss_fn.center.copy_(c0)
    teacher = torch.randn(10, 6)
    loss_fn(torch.randn(10, 6), teacher, 0)
    assert torch.allclose(loss_fn.center, 0.9 * c0 + 0.1 * teacher.mean(0, keepdim=True), atol=1e-6)
    no_center = loss_mod.DINOLoss(6, 2, 0.04, 0.04, 0, 1, centering=False)
    no_center(torch.randn(10, 6), teacher, 0)
    assert torch.equal(no_center.center, torch.zeros(1, 6))
    no_sharp = loss_mod.DINOLoss(6, 2, 0.04, 0.04, 0, 5, sharpening=False)
    assert no_sharp.teacher_temp(3) == 0.1


def test_teacher_temperature_schedule():
    loss_fn = loss_mod.DINOLoss(4, 2, 0.04, 0.07, 30, 100)
    sched = loss_fn.teacher_temp_schedule
    assert len(sched) == 100
    assert sched[0] == pytest.approx(0.04) and sched[29] == pytest.approx(0.07) and sched[99] == pytest.approx(0.07)
    assert sched[15] == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert loss_mod.DINOLoss(4, 2, 0.04, 0.04, 0, 10).teacher_temp_schedule == [0.04] * 10


def test_diagnostics_entropy_plus_kl_is_loss_and_bounds():
    torch.manual_seed(0)
    K = 32
    loss_fn = loss_mod.DINOLoss(K, 4, 0.04, 0.04, 0, 1)
    student, teacher = torch.randn(16, K), torch.randn(8, K)
    loss, d = loss_fn(student, teacher, 0, return_diagnostics=True)
    # KL and h computed independently: F.kl_div over the 2 (V - 1) pairs, and the teacher's entropy
    log_ps, log_pt = F.log_softmax(student / 0.1, dim=-1).chunk(4), F.log_softmax(teacher / 0.04, dim=-1).chunk(2)
    kl = sum(F.kl_div(log_ps[v], log_pt[t], log_target=True, reduction="batchmean")
             for t in range(2) for v in range(4) if v != t) / 6
    h = -(log_pt[0].exp() * log_pt[0]).sum(-1).mean() / 2 - (log_pt[1].exp() * log_pt[1]).sum(-1).mean() / 2
    assert torch.allclose(d["kl"], kl, atol=1e-5) and torch.allclose(d["entropy"], h, atol=1e-6)
    assert 0 <= d["entropy"] <= math.log(K) and d["kl"] > 0
    # a uniform teacher and student: h = log K, KL = 0 (the collapse signature)
    loss_fn = loss_mod.DINOLoss(K, 4, 0.04, 0.04, 0, 1)
    loss, d = loss_fn(torch.zeros(16, K), torch.zeros(8, K), 0, return_diagnostics=True)
    assert d["entropy"].item() == pytest.approx(math.log(K), rel=1e-5) and abs(d["kl"].item()) < 1e-5
    # sharp on a dimension of its own for each of the 8 teacher rows: h ~ 0 but the batch's mean spreads over 8
    sharp_apart = 10 * torch.eye(K)[:8]
    _, d = loss_mod.DINOLoss(K, 4, 0.04, 0.04, 0, 1)(student, sharp_apart, 0, return_diagnostics=True)
    assert d["entropy"] < 1e-3 and d["batch_entropy"].item() == pytest.approx(math.log(8), abs=1e-3)
    # sharp on the same dimension for every row (the other collapse): both near 0
    _, d = loss_mod.DINOLoss(K, 4, 0.04, 0.04, 0, 1)(student, sharp_apart[[0] * 8], 0, return_diagnostics=True)
    assert d["entropy"] < 1e-3 and d["batch_entropy"] < 1e-3


# ---------------------------------------------------------------- 05 teacher / EMA
def test_teacher_is_exact_copy_without_grad():
    student = head_mod.DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4)
    teacher = ema_mod.build_teacher(student)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values()))
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(student.parameters(), teacher.parameters()))


@pytest.mark.parametrize("m", [1.0, 0.0, 0.996])
def test_ema_rule(m):
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    teacher = ema_mod.build_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in teacher.parameters()]
    ema_mod.ema_update(teacher, student, m)
    for t0, t, s in zip(before, teacher.parameters(), student.parameters()):
        if m == 1.0:
            assert torch.equal(t, t0)  # m = 1: the teacher does not move
        elif m == 0.0:
            assert torch.equal(t, s)  # m = 0: the teacher becomes the student
        else:
            assert torch.allclose(t, m * t0 + (1 - m) * s, atol=1e-7)


def test_cosine_scheduler_official_values():
    s = ema_mod.cosine_scheduler(0.996, 1.0, epochs=10, niter_per_ep=5)
    assert len(s) == 50 and s[0] == 0.996
    assert s[25] == pytest.approx(1 + 0.5 * (0.996 - 1) * (1 + math.cos(math.pi * 25 / 50)))
    lr = ema_mod.cosine_scheduler(1e-3, 1e-6, epochs=10, niter_per_ep=5, warmup_epochs=2)
    assert np.allclose(lr[:10], np.linspace(0, 1e-3, 10))
    assert lr[10] == pytest.approx(1e-3) and lr[-1] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 39 / 40)))
    assert np.all(np.diff(lr[10:]) < 0)
