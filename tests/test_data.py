"""The small real datasets are rebuilt identically, offline, as ImageFolders with train/ and val/."""
import hashlib
import shutil

import numpy as np
import pytest

from conftest import load

data, images, makers = load("data"), load("images"), load("makers")


def digest(root):
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_digits_are_rebuilt_identically(tmp_path):
    makers.MAKERS["digits"](tmp_path / "a")
    makers.MAKERS["digits"](tmp_path / "b")
    a = digest(tmp_path / "a")
    assert a == digest(tmp_path / "b") and len(a) == 1797
    assert sum(k.startswith("val/") for k in a) == 359  # every fifth image
    train = data.build_dataset(str(tmp_path / "a"), "train")
    assert train.classes == [str(d) for d in range(10)] and train[0][0].size == (8, 8)


def test_crops_of_real_photographs_are_rebuilt_identically(tmp_path):
    for name, sources in (("photos", makers._photos()), ("surfaces", makers._gray_surfaces())):
        for copy in "ab":
            makers._write_crops(sources, tmp_path / name / copy, 5, (0.1, 0.3), "png")
        a = digest(tmp_path / name / "a")
        assert a == digest(tmp_path / name / "b") and len(a) == 5 * len(sources)
    assert len(makers._photos()) == 11 and len(makers._gray_surfaces()) == 7
    assert data.has_val(str(tmp_path / "photos" / "a")) and not data.has_val(str(tmp_path / "photos" / "a" / "train"))



def test_shape_folders_are_rebuilt_identically_and_draw_every_class(tmp_path):
    for draw, classes, any_gray in ((makers._draw_outline, makers.OUTLINES, False),
                                    (makers._draw_glyph, makers.GLYPHS, True)):
        for copy in "ab":
            makers._write_drawn(draw, classes, tmp_path / copy, any_gray, per_class=5)
        a = digest(tmp_path / "a")
        assert a == digest(tmp_path / "b") and len(a) == 5 * len(classes)
        train = data.build_dataset(str(tmp_path / "a"), "train")
        assert train.classes == sorted(classes) and train[0][0].size == (32, 32)
        shutil.rmtree(tmp_path / "a"), shutil.rmtree(tmp_path / "b")
    # with the same draws, the ten outlines differ from one another, and every font draws every letter
    masks = [np.asarray(makers._draw_outline(kind, np.random.RandomState(0), 128)) > 0 for kind in makers.OUTLINES]
    assert all((m != n).mean() > 0.02 for i, m in enumerate(masks) for n in masks[i + 1:])
    class EachFont(np.random.RandomState):
        font = 0

        def randint(self, n):  # the font drawn
            return self.font

    rng = EachFont(0)
    for rng.font in range(len(makers.FONTS)):
        assert all(np.asarray(makers._draw_glyph(letter, rng, 128)).mean() > 5 for letter in makers.GLYPHS), rng.font


# ---------------------------------------------------------------------------- large files, small crops
def test_every_crop_of_a_shrunk_image_keeps_twice_its_pixels():
    import random
    fast = load("multicrop_fast")
    views = [(32, 0.4), (16, 0.1)]  # the course preset's global and local crops
    side = images.shrink_side(views + [(37, None)])
    assert side == 117
    rng = random.Random(0)
    for W, H in ((side, side), (side * 4 // 3, side), (side, side * 16 // 9)):  # the shorter side at `side`
        for size, smallest in views:
            boxes = [fast.random_resized_crop_box(W, H, (smallest, 1.0), rng) for _ in range(2000)]
            assert min(min(w, h) for _, _, w, h in boxes) >= 2 * size - 1  # rounding of the box


def test_large_images_are_decoded_once_shrunk_and_crop_alike(tmp_path, capsys, monkeypatch):
    import skimage.data
    from PIL import Image
    photo = Image.fromarray(skimage.data.astronaut())  # 512 x 512, real detail
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                photo.rotate(90 * i).save(tmp_path / split / c / f"{i}.jpg", quality=95)
    (tmp_path / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # 4th of class a
    side = images.shrink_side([(32, 0.4), (37, None)])  # 117 < 512 / 2
    ds = data.build_dataset(str(tmp_path), "train", shrink=side)
    assert isinstance(ds.loader, images.ShrunkImages) and ds[0][0].size == (side, side)
    assert capsys.readouterr().err.count("7 train images are far larger") == 1
    with pytest.warns(UserWarning, match="broken.jpg"):  # a bad file is still skipped, with its name
        assert ds[3][0].size == (side, side)
    again = data.build_dataset(str(tmp_path), "train", shrink=side)  # the k-NN memory bank: kept, not decoded again
    assert all(again.loader.images[p] is ds.loader.images[p] for p, _ in ds.samples)
    assert "far larger" not in capsys.readouterr().err
    small = data.build_dataset(str(tmp_path), "train", shrink=300)  # not over twice as large: read as before
    assert small.loader is data.open_image
    monkeypatch.setattr(data, "KEEP_BYTES", 6 * 3 * 64 ** 2)  # room for 6 images of 64 x 64, and there are 7
    many = data.build_dataset(str(tmp_path), "train", shrink=64)  # each read decodes at reduced size instead
    assert many.loader.func is data.open_image and many[0][0].size == (64, 64)
    assert capsys.readouterr().err.count("too many to keep in memory") == 1

    # the smallest global crop (40 % of the area), from the file and from the shrunk copy: the same to about a gray
    # level; from a copy with fewer pixels than the crop's output, blurred
    import torch
    import torch.nn.functional as F
    square = photo.crop((22, 22, 490, 490))  # 468 = 4 x 117 = 12 x 39 px: the box below falls on whole pixels
    square.save(tmp_path / "square.jpg", quality=95)
    def crop(img):  # x and y from 8/39 to 33/39 of the image: 300 px here, 75 px at 117, 25 px at 39
        t = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()
        a, b = (round(f * t.shape[-1] / 39) for f in (8, 33))
        return F.interpolate(t[..., a:b, a:b], (32, 32), mode="bicubic", antialias=True).clamp(0, 255)
    reference = crop(data.open_image(tmp_path / "square.jpg"))
    err = [(crop(data.open_image(tmp_path / "square.jpg", s)) - reference).abs().mean().item() for s in (side, 39)]
    assert err[0] < 1.5 and err[1] > 3 * err[0], err


def test_a_photo_stored_sideways_is_turned_as_viewers_show_it(tmp_path):
    import torch
    from PIL import Image
    fast = load("multicrop_fast")
    upright = data.draw_texture(np.random.RandomState(0), 0, 64).crop((0, 0, 40, 64))  # portrait, 40 x 64
    exif = Image.Exif()
    exif[images.ORIENTATION] = 6  # stored turned a quarter to the left, as phones store portrait photos
    upright.rotate(90, expand=True).save(tmp_path / "p.jpg", exif=exif, quality=95)
    assert Image.open(tmp_path / "p.jpg").size == (64, 40)
    img = data.open_image(tmp_path / "p.jpg")
    assert img.size == (40, 64) and np.abs(np.asarray(img, float) - np.asarray(upright, float)).mean() < 3
    geometry = fast.MultiCropGeometry(local_crops_number=2, global_size=16, local_size=8)
    torch.manual_seed(0)
    from_file = geometry(tmp_path / "p.jpg")  # the training path, which decodes JPEGs itself
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(from_file, geometry(img)))
