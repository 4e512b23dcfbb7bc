"""Sec. 4.2.2 as tests: the embedded scenes hide their object from single pixels and their class from the
background; the Jaccard protocol scores what it says; the command line keeps the one-line error contract."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, load

seg = load("10_segmentation")
scenes = load("scenes")


@pytest.fixture(scope="module")
def val():
    return scenes.ScenesDataset("val", per_class=12)


def test_scenes_are_the_same_on_every_run(val):
    again = scenes.ScenesDataset("val", per_class=12)
    assert np.array_equal(val.images, again.images) and np.array_equal(val.masks, again.masks)
    assert 0.05 < val.masks.mean() < 0.5  # an object, not the whole image, in every scene
    assert val.masks.reshape(len(val), -1).any(1).all()


def test_no_single_pixel_tells_object_from_background(val):
    """A classifier that learns from one pixel's colour on some scenes cannot find the object in others: its
    balanced accuracy stays near 50 %."""
    from sklearn.ensemble import RandomForestClassifier
    rng = np.random.RandomState(0)

    def pixels(images, masks):  # as many object as background pixels
        rgb, obj = images.reshape(-1, 3), masks.reshape(-1)
        idx = np.concatenate([rng.choice(np.flatnonzero(obj == v), 3000, replace=False) for v in (0, 1)])
        return rgb[idx], obj[idx]

    half = len(val) // 2  # different scenes for learning and testing
    clf = RandomForestClassifier(50, min_samples_leaf=20, random_state=0).fit(*pixels(val.images[:half], val.masks[:half]))
    assert clf.score(*pixels(val.images[half:], val.masks[half:])) < 0.6


def test_the_background_does_not_predict_the_class():
    """Colour statistics of the background alone (the object blanked out) classify at chance; the same
    statistics of the object's pixels do no better, so the class is in the shape only."""
    from sklearn.linear_model import LogisticRegression
    ds = scenes.ScenesDataset("train", per_class=60)
    feats = []
    for img, m in zip(ds.images.astype(float), ds.masks):
        bg = img[~m]
        feats.append(np.concatenate([bg.mean(0), bg.std(0), np.histogram(bg.mean(1), 8, (0, 255))[0] / len(bg)]))
    X, y, h = np.array(feats), np.array(ds.targets), len(ds) // 2  # the first half learns, the second is scored

    def score(X):
        X = (X - X[:h].mean(0)) / (X[:h].std(0) + 1e-9)
        return LogisticRegression(max_iter=5000).fit(X[:h], y[:h]).score(X[h:], y[h:])

    assert score(X) < 1 / len(scenes.CLASSES) + 0.1  # chance is 12.5 %
    # the same test passes the masks' own shape statistics: they do carry the class
    shape = np.array([[m.sum(), (m[1:] != m[:-1]).sum() + (m[:, 1:] != m[:, :-1]).sum()] for m in ds.masks], float)
    shape = np.c_[shape, shape[:, 1] ** 2 / shape[:, 0]]  # perimeter^2 / area: compactness
    assert score(shape) > 0.3


def test_the_background_does_not_tell_the_scenes_apart(val):
    """Two parts of one scene's clutter are no more alike than parts of two scenes: the mean and spread of the
    background's grays on the left half do not predict those on the right half. So DINO cannot match two crops
    of a scene by their clutter; what they share is the object."""
    g, m, half = val.images[..., 0].astype(float), val.masks, scenes.SIZE // 2

    def stats(cols):  # mean and spread of the background's grays in those columns, per scene
        return np.array([(gi[:, cols][~mi[:, cols]].mean(), gi[:, cols][~mi[:, cols]].std()) for gi, mi in zip(g, m)])

    left, right = stats(slice(None, half)), stats(slice(half, None))
    for j in range(2):
        assert abs(np.corrcoef(left[:, j], right[:, j])[0, 1]) < 0.35


def test_jaccard_of_the_truth_is_100_and_of_its_complement_0(val):
    truth = torch.from_numpy(val.masks.astype(np.uint8))
    assert torch.equal(seg.jaccard(truth.bool(), truth), torch.full((len(val),), 100.0))
    assert seg.jaccard(~truth.bool(), truth).max() == 0
    half = truth.bool().clone()
    half[:, :, 32:] = False  # keeps the object's left part: J = |left of object| / |object|
    expected = 100 * truth[:, :, :32].sum((1, 2)).float() / truth.sum((1, 2)).float()
    assert torch.allclose(seg.jaccard(half, truth), expected)


def test_attention_that_prefers_nothing_puts_the_objects_area_on_it(val):
    truth = torch.from_numpy(val.masks.astype(np.uint8))[:8]
    uniform = torch.full((8, 2, 8, 8), 1 / 64)  # two heads, 8 x 8 patches of 8 px
    area = truth.float().mean((1, 2))
    assert torch.allclose(seg.object_share(uniform, truth, 8), area[:, None].expand(8, 2), atol=1e-6)
    cover = torch.nn.functional.avg_pool2d(truth.float()[:, None], 8)  # attention exactly where the object is
    assert torch.allclose(seg.object_share(cover / cover.sum((-2, -1), keepdim=True), truth, 8).squeeze(1),
                          (cover ** 2).sum((-2, -1)).squeeze(1) / cover.sum((-2, -1)).squeeze(1))
    inside = (cover == 1).float()  # only patches wholly inside the object, on the scenes that have some
    some = inside.sum((1, 2, 3)) > 0
    assert some.sum() >= 4
    inside = inside[some] / inside[some].sum((-2, -1), keepdim=True)
    assert torch.allclose(seg.object_share(inside, truth[some], 8), torch.ones(int(some.sum()), 1))


def test_void_pixels_are_not_scored():
    truth = torch.tensor([[1, 1, 255, 0]], dtype=torch.uint8)
    pred = torch.tensor([[True, True, True, False]])  # the void pixel predicted object: no penalty
    assert seg.jaccard(pred, truth) == 100
    assert seg.jaccard(torch.tensor([[True, False, False, True]]), truth) == pytest.approx(100 / 3)


def test_attention_masks_hold_the_threshold_share_of_each_head(vit):
    torch.manual_seed(0)
    model = vit.vit_nano(patch_size=8, img_size=64)
    x = torch.randn(3, 3, 64, 48)
    maps, keep = seg.attention_masks(model, x, 8, threshold=0.6)
    assert maps.shape == (3, 4, 8, 6) and keep.shape == (3, 4, 64, 48)
    patches = keep[:, :, ::8, ::8]  # one pixel per patch
    mass = (maps * patches).sum((-2, -1))
    assert (mass >= 0.6 - 1e-6).all()
    # smallest: without its weakest kept patch, a mask holds less than the threshold
    weakest = torch.where(patches, maps, torch.inf).flatten(2).min(-1).values
    assert (mass - weakest < 0.6).all()


def _voc(root, n=3):
    """A tiny PASCAL VOC folder from the scenes: JPEGImages/, SegmentationObject/ palette PNGs, the val list."""
    ds = scenes.ScenesDataset("val", per_class=1)
    for d in ("JPEGImages", "SegmentationObject", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(ds.images[i]).save(root / "JPEGImages" / f"{i}.jpg")
        mask = ds.masks[i].astype(np.uint8)
        mask[0, :] = seg.VOID
        scenes.save_mask(mask, root / "SegmentationObject" / f"{i}.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("".join(f"{i}\n" for i in range(n)))
    return root


def _cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "10_segmentation.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_a_voc_folder_is_scored_and_the_json_written(tmp_path, vit):
    voc = _voc(tmp_path / "voc")
    r = _cli("--random_init", "--arch", "vit_nano", "--patch_size", "8", "--data_path", str(voc),
             "--image_size", "64", "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("jaccard: ") and 0 <= float(line.split()[1]) <= 100
    import json
    res = json.loads((tmp_path / "out" / "jaccard_random_init.json").read_text())
    assert res["images"] == 3 and len(res["per_head"]) == 4
    assert 0 < res["attention_on_object"] < 100 and 0 < res["object_area"] < 100


@pytest.mark.parametrize("case", ["missing_mask", "other_size", "not_voc", "threshold_0", "threshold_above_1"])
def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, case):
    voc = _voc(tmp_path / "voc")
    flags = ["--threshold", "0.6"]
    if case == "missing_mask":
        (voc / "SegmentationObject" / "1.png").unlink()
    elif case == "other_size":
        scenes.save_mask(np.zeros((10, 12), np.uint8), voc / "SegmentationObject" / "2.png")
    elif case == "not_voc":
        voc = tmp_path
    else:
        flags = ["--threshold", "0" if case == "threshold_0" else "1.5"]
    out = tmp_path / "out"
    r = _cli("--random_init", "--arch", "vit_nano", "--patch_size", "8", "--data_path", str(voc),
             "--image_size", "64", "--output_dir", str(out), *flags, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not out.exists()
    if case == "missing_mask":
        assert "1.png" in lines[0]
    if case == "other_size":
        assert "2.png" in lines[0]
