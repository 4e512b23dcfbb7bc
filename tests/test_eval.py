"""06_knn.py and 07_attention.py: the evaluation protocols on cases where the answer is known."""
import argparse
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, load, make_image_folder

knn = load("06_knn")
att = load("07_attention")
vits = load("02_vit")
ckpt = load("checkpoint")


def clustered(n_per_class, n_classes, dim=64, noise=0.05, seed=0):
    centers = F.normalize(torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(123)), dim=1)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    feats = F.normalize(centers[labels] + noise * torch.randn(len(labels), dim, generator=g), dim=1)
    return feats, labels


def test_knn_exact_on_clustered_features_any_class_count():
    for n_classes in (2, 3, 7, 1000):
        tr_f, tr_l = clustered(5, n_classes)
        te_f, te_l = clustered(2, n_classes, seed=1)
        top1, top5 = knn.knn_classifier(tr_f, tr_l, te_f, te_l, k=20, T=0.07)
        assert top1 == 100.0 and top5 == 100.0


def test_knn_tiny_test_set_smaller_than_k_and_chunking():
    tr_f, tr_l = clustered(3, 4)  # 12 training points < k = 20, 200
    te_f, te_l = clustered(1, 4, seed=2)  # 4 test images
    assert knn.knn_classifier(tr_f, tr_l, te_f, te_l, k=200)[0] == 100.0
    wrong = (te_l + 1) % 4
    assert knn.knn_classifier(tr_f, tr_l, te_f, wrong, k=20, chunk=3)[0] == 0.0


def test_knn_votes_are_weighted_by_exp_sim_over_T():
    # one query; neighbours: class 0 at similarity 0.9 (one of them), class 1 at 0.8 (two of them)
    q = torch.tensor([[1.0, 0.0]])
    def unit(s):
        return torch.tensor([s, math.sqrt(1 - s * s)])
    train_f = torch.stack([unit(0.9), unit(0.8), unit(0.8)])
    train_l = torch.tensor([0, 1, 1])
    # T = 0.07: exp(0.9/T) = 3.8e5 vs 2 exp(0.8/T) = 1.9e5 -> class 0; T = 1: e^0.9 < 2 e^0.8 -> class 1
    assert knn.knn_classifier(train_f, train_l, q, torch.tensor([0]), k=3, T=0.07)[0] == 100.0
    assert knn.knn_classifier(train_f, train_l, q, torch.tensor([1]), k=3, T=1.0)[0] == 100.0
    # top-5 holds the runner-up: with 7 classes, class 1 is second at T = 0.07 (top-1 wrong, top-5 right)
    assert knn.knn_classifier(train_f, train_l, q, torch.tensor([1]), k=3, T=0.07, num_classes=7) == (0.0, 100.0)


@pytest.mark.parametrize("patch,hw", [(16, (64, 80)), (8, (40, 40)), (4, (30, 22))])
def test_attention_maps_shape_and_sum(patch, hw):
    torch.manual_seed(0)
    model = vits.VisionTransformer(img_size=32, patch_size=patch, embed_dim=24, depth=2, num_heads=3)
    img = torch.randn(3, *hw)
    maps = att.attention_maps(model, img, patch)
    assert maps.shape == (3, hw[0] // patch, hw[1] // patch)
    # the CLS row of the last block's softmax, its CLS-to-CLS share removed, written out here from q and k
    h, w = hw[0] - hw[0] % patch, hw[1] - hw[1] % patch
    x = model.prepare_tokens(img[None, :, :h, :w])
    for blk in model.blocks[:-1]:
        x = blk(x)
    q, k, _ = model.blocks[-1].attn.qkv(model.blocks[-1].norm1(x)).reshape(1, -1, 3, 3, 8).permute(2, 0, 3, 1, 4)
    a = ((q @ k.transpose(-2, -1)) * 8 ** -0.5).softmax(-1)[0, :, 0]  # (heads, N)
    assert torch.allclose(maps.flatten(1), a[:, 1:] / (1 - a[:, :1]), atol=1e-5)


def test_threshold_mask_is_the_smallest_set_holding_the_mass():
    torch.manual_seed(0)
    maps = torch.rand(4, 6, 5)
    maps = maps / maps.flatten(1).sum(1)[:, None, None]
    for t in (0.1, 0.6, 0.9, 1.0):
        mask = att.threshold_masks(maps, t)
        for h in range(4):
            kept = maps[h][mask[h]]
            assert kept.sum() >= t - 1e-6  # holds the mass
            assert kept.sum() - kept.min() < t  # and is minimal: without its weakest patch it would not
            dropped = maps[h][~mask[h]]
            assert len(dropped) == 0 or dropped.max() <= kept.min()  # the largest patches are the ones kept


def test_official_released_backbone_format_loads_and_matches(tmp_path):
    """A released file is a bare teacher-backbone state dict; an official full checkpoint carries
    prefixes. Both load strictly and give the same features."""
    torch.manual_seed(0)
    model = vits.vit_small(patch_size=16).eval()
    sd = model.state_dict()
    torch.save(sd, tmp_path / "dino_deitsmall16_pretrain.pth")
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()},
                "student": {f"module.backbone.{k}": v for k, v in sd.items()},
                "args": argparse.Namespace(arch="vit_small", patch_size=16)}, tmp_path / "full.pth")
    x = torch.randn(2, 3, 224, 224)
    for name, key in (("dino_deitsmall16_pretrain.pth", "teacher"), ("full.pth", "teacher"), ("full.pth", "student")):
        loaded = vits.vit_small(patch_size=16).eval()
        ckpt.load_strict(loaded, ckpt.backbone_state_dict(ckpt.load_file(tmp_path / name), key), name)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


def test_knn_and_attention_clis_on_a_train_checkpoint(tmp_path):
    """The README's commands on one of our checkpoints (a random-init network saved as one)."""
    torch.manual_seed(0)
    backbone = vits.vit_nano(patch_size=8, img_size=16)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                "args": {"arch": "vit_nano", "patch_size": 8, "global_size": 16}}, tmp_path / "checkpoint.pth")
    folder = make_image_folder(tmp_path / "data", (0, 1, 2), {"train": 5, "val": 2})
    r = subprocess.run([sys.executable, "06_knn.py", "--checkpoint", str(tmp_path / "checkpoint.pth"),
                        "--data_path", str(folder), "--num_workers", "0"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("k-NN top-1 (k=15): ")  # k at most the 15 training images
    result = json.loads((tmp_path / "knn.json").read_text())
    assert set(result["knn"]) == {"10", "15"}  # 20, 100 and 200 ran as 15-NN
    r = subprocess.run([sys.executable, "07_attention.py", "--checkpoint", str(tmp_path / "checkpoint.pth"),
                        "--image", str(folder / "val" / "hstripes" / "0.png"), "--image_size", "32",
                        "--threshold", "0.6", "--output_dir", str(tmp_path / "att")], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "att" / "attention.png").exists() and (tmp_path / "att" / "attn-head3.png").exists()
    r = subprocess.run([sys.executable, "07_attention.py", "--random_init", "--arch", "vit_nano", "--image_size", "32",
                        "--output_dir", str(tmp_path / "rand")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "rand" / "attention.png").exists()


def test_knn_raw_pixels_baseline(tmp_path):
    """--raw_pixels: the pixels as features; dark against light images must be told apart exactly."""
    import numpy as np
    from PIL import Image
    rng = np.random.RandomState(0)
    for split, n in (("train", 6), ("val", 3)):
        for name, level in (("dark", 40), ("light", 210)):
            d = tmp_path / split / name
            d.mkdir(parents=True)
            for i in range(n):
                pixels = (level + rng.normal(0, 10, (16, 16, 3))).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    r = subprocess.run([sys.executable, "06_knn.py", "--raw_pixels", "--image_size", "16", "--data_path", str(tmp_path),
                        "--num_workers", "0", "--output_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "k-NN top-1 (k=12): 100.00%"
    assert json.loads((tmp_path / "knn_raw_pixels.json").read_text())["source"] == "raw pixels"
