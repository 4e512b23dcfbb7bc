"""11_video.py: label propagation and the DAVIS-2017 scores on cases where the answer is known; its command line on
a generated DAVIS folder; and its bad input (one `error:` line, exit code 2, nothing written)."""
import contextlib
import io
import json
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image
from skimage.morphology import dilation, disk

from conftest import load
from test_bad_input import payloads, snapshot, values, write

video = load("11_video")
cli = load("cli")
vits = load("02_vit")
NANO = ["--random_init", "--arch", "vit_nano", "--patch_size", "8"]


# ---------------------------------------------------------------------------- generated videos
def texture(rng, h, w, cell):
    """Random colours in cells of cell x cell px: every patch looks different from the others."""
    return np.kron(rng.rand(-(-h // cell), -(-w // cell), 3), np.ones((cell, cell, 1)))[:h, :w]


def moving_square(frames=4, h=32, w=48, side=16, step=4, seed=0):
    """A textured square moving right over a textured background, its left and right halves objects 1 and 2:
    (PIL frames, uint8 masks)."""
    rng = np.random.RandomState(seed)
    background, square = 0.2 + 0.6 * texture(rng, h, w, 4), texture(rng, side, side, 2)
    images, masks = [], []
    for t in range(frames):
        y, x = (h - side) // 2, 4 + t * step
        img, mask = background.copy(), np.zeros((h, w), np.uint8)
        img[y:y + side, x:x + side] = square
        mask[y:y + side, x:x + side // 2], mask[y:y + side, x + side // 2:x + side] = 1, 2
        images.append(Image.fromarray((255 * img).astype(np.uint8)))
        masks.append(mask)
    return images, masks


def write_davis(root, sequences, listing=True):
    """A folder laid out as DAVIS-2017 from {name: (frames, masks)}, with ImageSets/2017/val.txt."""
    for name, (frames, masks) in sequences.items():
        (root / "JPEGImages/480p" / name).mkdir(parents=True)
        (root / "Annotations/480p" / name).mkdir(parents=True)
        for t, (frame, mask) in enumerate(zip(frames, masks)):
            frame.save(root / "JPEGImages/480p" / name / f"{t:05d}.jpg", quality=95)
            video.write_mask(root / "Annotations/480p" / name / f"{t:05d}.png", mask)
    if listing:
        (root / "ImageSets/2017").mkdir(parents=True)
        (root / "ImageSets/2017/val.txt").write_text("".join(f"{n}\n" for n in sequences))
    return root


def nano():
    torch.manual_seed(0)
    return vits.vit_nano(patch_size=8).eval()


# ---------------------------------------------------------------------------- the propagation
def neighbourhood_by_loops(h, w, r):
    """The official construction, four nested loops: target (i, j) sees source (i + a, j + b), |a|, |b| <= r."""
    mask = torch.zeros(h, w, h, w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            for a in range(-r, r + 1):
                for b in range(-r, r + 1):
                    if 0 <= i + a < h and 0 <= j + b < w:
                        mask[i, j, i + a, j + b] = True
    return mask.reshape(h * w, h * w)


@pytest.mark.parametrize("h,w,r", [(3, 4, 1), (5, 3, 0), (4, 4, 2), (2, 6, 12), (6, 5, 3), (1, 7, 2)])
def test_vectorised_neighbourhood_equals_the_four_loops(h, w, r):
    near = video.neighbourhood(h, w, r)
    assert near.dtype == torch.bool and torch.equal(near, neighbourhood_by_loops(h, w, r))
    assert video.neighbourhood(h, w, r) is near  # cached: built once per frame size


@pytest.mark.parametrize("hw,image_size,patch,expected", [
    ((480, 854), 480, 16, (480, 832)),  # DAVIS 480p: the official 832 px, a multiple of 64
    ((854, 480), 480, 8, (832, 480)),
    ((480, 480), 480, 8, (480, 448)),  # the official rule squashes a square at 480 px
    ((48, 96), 48, 8, (48, 96)),  # elsewhere multiples of the patch size: 96 stays 96 (not 64)
    ((50, 70), 50, 8, (48, 64)),
    ((64, 64), 96, 16, (96, 96)),
])
def test_frames_are_resized_as_official_at_480_px(hw, image_size, patch, expected):
    assert video.resized_shape(*hw, image_size, patch) == expected


def test_a_static_video_keeps_the_first_mask():
    """The same frame repeated: each patch's most similar context patch is itself (cosine 1), so with top-1 every
    frame gets exactly the first mask's labels on the patch grid, decoded as the first frame's would be."""
    frames, masks = moving_square(frames=1, h=48, w=48, side=24)
    model = nano()
    preds = video.segment_video(model, frames * 5, masks[0], 8, topk=1)
    expected = video.decode(video.one_hot(masks[0], 6, 6, 2), 6, 6, 8, (48, 48))
    assert np.array_equal(preds[0], masks[0])  # the first frame is the annotation itself
    for pred in preds[1:]:
        assert np.array_equal(pred, expected)


def test_propagation_follows_an_object_within_the_neighbourhood():
    """Features that say object or background (cosine 1 within a kind, 0 across): an object of 2 x 2 patches moving
    3 patches per frame is followed with the neighbourhood off (r = 0) or wide enough, and lost with r = 1."""
    h = w = 8
    def frame(col):  # (features (h w, 2), labels (h w,)) with the object at rows 3-4, columns col..col+1
        obj = torch.zeros(h, w, dtype=torch.bool)
        obj[3:5, col:col + 2] = True
        return torch.stack([~obj, obj], dim=-1).float().flatten(0, 1), obj.flatten().long()
    (f0, y0), (f1, y1) = frame(0), frame(3)
    first = torch.nn.functional.one_hot(y0, 2).T.float()[None]  # (1, C, n)
    for r, followed in [(0, True), (3, True), (1, False)]:
        near = video.neighbourhood(h, w, r) if r else None
        y = video.propagate(f1, f0[None], first, near, topk=5, temperature=0.1)
        assert torch.equal(y.argmax(0), y1) == followed
    assert torch.allclose(y.sum(0), torch.ones(h * w))  # each row of A sums to 1


class PatchColours(torch.nn.Module):
    """A stand-in backbone whose patch features are the patches' mean colours (and the CLS token a copy of the
    first): a red object and a blue background are told apart by the features alone."""

    def __init__(self, patch_size):
        super().__init__()
        self.patch_size, self.unused = patch_size, torch.nn.Parameter(torch.zeros(1))

    def get_intermediate_layers(self, x, n=1):
        f = torch.nn.functional.avg_pool2d(x, self.patch_size).flatten(2).transpose(1, 2)  # (1, h w, 3)
        return [torch.cat([f[:, :1], f], dim=1)]


def test_the_previous_frames_carry_the_object_beyond_the_first_frames_neighbourhood():
    """A red 2 x 2-patch square moves one patch per frame over blue: with r = 1, the first frame's square is soon
    out of reach, and only the predicted masks of the previous frames carry it on (n_last_frames = 0 loses it)."""
    frames, masks = [], []
    for t in range(10):
        img, mask = np.zeros((48, 96, 3), np.uint8), np.zeros((48, 96), np.uint8)
        img[..., 2] = 255
        img[16:32, 8 + 8 * t:24 + 8 * t] = (255, 0, 0)
        mask[16:32, 8 + 8 * t:24 + 8 * t] = 1
        frames.append(Image.fromarray(img))
        masks.append(mask)
    def j(n_last_frames):
        preds = video.segment_video(PatchColours(8), frames, masks[0], 8, n_last_frames=n_last_frames,
                                    size_mask_neighborhood=1)
        return video.score_sequence(preds, masks)["J"][0]
    # followed to the last frame, but for 6 px at each corner of the square, rounded off by the bilinear upsampling
    assert j(7) == j(1) == pytest.approx(100 * (256 - 4 * 6) / 256) and j(0) < 30


def test_propagation_weights_are_exp_cos_over_T_among_the_top_k():
    """One target patch, three context patches at cosines 0.9 (object), 0.8 and 0.7 (background), top-2."""
    angles = torch.tensor([0.9, 0.8, 0.7]).acos()
    keys = torch.stack([angles.cos(), angles.sin()], dim=1)  # (3, 2), unit vectors
    labels = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # (C, n): patch 0 object, 1 and 2 background
    for T in (0.1, 1.0, 1e-300):
        y = video.propagate(torch.tensor([[1.0, 0.0]]), keys[None], labels[None], None, topk=2, temperature=T)
        expected = 1 / (1 + np.exp(-0.1 / T))  # exp(0.9/T) / (exp(0.9/T) + exp(0.8/T)); 0.7 is not in the top 2
        assert y[1, 0].item() == pytest.approx(expected, abs=1e-6) and y[:, 0].sum().item() == pytest.approx(1)


def test_decode_normalises_each_channel_so_a_faint_object_keeps_its_place():
    y = torch.zeros(2, 3, 3)
    y[0] = 0.9
    y[0, 1, 1], y[1, 1, 1] = 0.85, 0.15  # the object's channel is faint, but highest at the centre patch
    labels = video.decode(y.flatten(1), 3, 3, 4, (12, 12))
    assert labels[6, 6] == 1 and labels[0, 0] == 0  # without the min-max normalisation, background everywhere


# ---------------------------------------------------------------------------- the scores
def test_j_and_f_of_a_perfect_and_a_partial_prediction():
    gt = np.zeros((10, 10), np.uint8)
    gt[2:6, 2:6] = 1  # 16 px
    shifted = np.roll(gt, 2, axis=1)  # 8 px in common, 24 in the union
    empty = np.zeros_like(gt)
    assert video.score_sequence([gt] * 4, [gt] * 4) == {"J": [100.0], "F": [100.0]}
    # the first and the last frame are not scored: wrong there, perfect in between
    assert video.score_sequence([empty, gt, gt, empty], [gt] * 4)["J"] == [100.0]
    assert video.score_sequence([gt, shifted, gt, gt], [gt] * 4)["J"] == pytest.approx([100 * (8 / 24 + 1) / 2])
    assert video.region_similarity(empty > 0, empty > 0) == 1.0  # both empty: the toolkit's 1
    two = gt + 2 * np.roll(gt, 4, axis=0)  # object 2 below object 1
    assert video.score_sequence([two, two - (two == 2) * 2, two], [two] * 3)["J"] == [100.0, 0.0]


def seg2bmap(mask):
    """The toolkit's boundary map, written out with its edge rules: right / lower / lower-right neighbours; the
    last row compares right only, the last column down only, the corner is never a boundary."""
    e, s, se = (np.zeros_like(mask) for _ in range(3))
    e[:, :-1], s[:-1, :], se[:-1, :-1] = mask[:, 1:], mask[1:, :], mask[1:, 1:]
    b = (mask ^ e) | (mask ^ s) | (mask ^ se)
    b[-1, :], b[:, -1] = mask[-1, :] ^ e[-1, :], mask[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def f_reference(pred, gt):
    """The toolkit's F with scikit-image's dilation, as a reference for the convolution used in 11_video.py."""
    radius = int(np.ceil(0.008 * np.linalg.norm(gt.shape)))
    pb, gb = seg2bmap(pred), seg2bmap(gt)
    if not pb.any() or not gb.any():
        return float(pb.any() == gb.any())
    p = (pb & dilation(gb, disk(radius))).sum() / pb.sum()
    r = (gb & dilation(pb, disk(radius))).sum() / gb.sum()
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


@settings(max_examples=40, deadline=None, database=None)
@given(st.integers(0, 2 ** 31), st.sampled_from([(20, 30), (64, 48), (300, 200)]))
def test_boundary_f_equals_the_toolkit_definition(seed, shape):
    rng = np.random.RandomState(seed)
    def blob():  # blocks of random size: boundaries of every shape, touching the image's border too
        cells = rng.rand(rng.randint(1, 8), rng.randint(1, 8)) < rng.rand()
        return np.kron(cells, np.ones((-(-shape[0] // cells.shape[0]), -(-shape[1] // cells.shape[1]))))[
            :shape[0], :shape[1]].astype(bool)
    pred, gt = blob(), blob()
    assert np.array_equal(video.boundary(gt), seg2bmap(gt))
    assert video.boundary_f(pred, gt) == pytest.approx(f_reference(pred, gt), abs=1e-12)


def test_boundary_f_tolerance():
    gt = np.zeros((100, 100), bool)
    gt[30:70, 30:70] = True  # diagonal 141 px: boundaries match within ceil(0.008 x 141) = 2 px
    assert video.boundary_f(np.roll(gt, 2, axis=1), gt) == 1.0
    assert video.boundary_f(np.roll(gt, 10, axis=1), gt) < 0.6


def test_palette_png_round_trip(tmp_path):
    mask = np.arange(64, dtype=np.uint8).reshape(8, 8) % 5
    mask[0, 0] = 255
    video.write_mask(tmp_path / "m.png", mask)
    image = Image.open(tmp_path / "m.png")
    assert image.mode == "P" and np.array_equal(video.read_mask(tmp_path / "m.png"), mask)
    palette = np.array(image.getpalette()).reshape(-1, 3)
    # DAVIS's colours (PASCAL VOC's map): as in the toolkit's own example results
    assert palette[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert palette[255].tolist() == [224, 224, 192] and len(palette) == 256


# ---------------------------------------------------------------------------- the command line
def run(argv, capsys):
    code = cli.run(video.main, video.get_args_parser().parse_args, argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_on_a_davis_folder(tmp_path, capsys):
    square = moving_square(frames=4)
    write_davis(tmp_path / "davis", {"square": square, "still": moving_square(frames=3, step=0, seed=1)})
    code, out, err = run(NANO + ["--data_path", str(tmp_path / "davis"), "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert "J mean: " in out and "F mean: " in out and "J&F mean: " in out and "square: 4 frames, 2 object(s)" in out
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert files == [f"square/{t:05d}.png" for t in range(4)] + [f"still/{t:05d}.png" for t in range(3)]
    first = Image.open(tmp_path / "out/square/00000.png")
    assert first.mode == "P" and np.array_equal(np.array(first), square[1][0])
    scores = json.loads((tmp_path / "out/scores.json").read_text())
    objects = scores["sequences"]["square"]["J_per_object"] + scores["sequences"]["still"]["J_per_object"]
    assert len(objects) == 4 and scores["J_mean"] == pytest.approx(np.mean(objects))  # over objects, as DAVIS
    assert f"J mean: {scores['J_mean']:.1f}" in out


@pytest.fixture
def fake_scenes(monkeypatch):
    module = types.SimpleNamespace(video_sequences=lambda split="val": [("square-00", *moving_square(frames=3))])
    monkeypatch.setitem(sys.modules, "scenes", module)


def test_cli_on_the_embedded_scenes(fake_scenes, tmp_path, capsys):
    code, out, err = run(NANO + ["--data_path", "scenes", "--output_dir", str(tmp_path)], capsys)
    assert code == 0 and "square-00: 3 frames" in out and (tmp_path / "square-00/00002.png").is_file(), err


def test_scenes_not_available(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "scenes", None)  # as if there were no scenes.py
    code, _, err = run(NANO + ["--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2 and err.startswith("error: scenes data not available") and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------- bad input
@pytest.fixture
def davis(tmp_path):
    """A valid DAVIS folder of two sequences, to be broken by each test; outputs would go to tmp_path / out."""
    return write_davis(tmp_path / "davis", {"a": moving_square(frames=3), "b": moving_square(frames=3, seed=1)})


def contract(argv, root):
    """The checks of 11_video.py on argv: (exit code, stderr), with one `error:` line and nothing written."""
    before = snapshot(root)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.run(lambda args: video.prepare(args) and None, video.get_args_parser().parse_args, argv)
    err = err.getvalue()
    assert code in (0, 2) and "Traceback" not in err, err
    if code == 2:
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert snapshot(root) == before
    return code, err


def base(davis):
    return NANO + ["--data_path", str(davis), "--output_dir", str(davis.parent / "out")]


def gray_png(path, array):
    Image.fromarray(array.astype(np.uint8), mode="L").save(path)


BROKEN = {  # how to break the folder, what the error says
    "no first-frame annotation": (lambda d: (d / "Annotations/480p/b/00000.png").unlink(),
                                  "no first-frame annotation {d}/Annotations/480p/b/00000.png"),
    "a later annotation missing": (lambda d: (d / "Annotations/480p/a/00002.png").unlink(),
                                   "missing annotation {d}/Annotations/480p/a/00002.png"),
    "annotation of another size": (lambda d: gray_png(d / "Annotations/480p/a/00001.png", np.ones((32, 40))),
                                   "annotation {d}/Annotations/480p/a/00001.png is 40 x 32 px but its frame is 48 x 32"),
    "frames of different sizes": (lambda d: Image.new("RGB", (40, 32)).save(d / "JPEGImages/480p/b/00002.jpg"),
                                  "{d}/JPEGImages/480p/b/00002.jpg is 40 x 32 px but the first frame of b is 48 x 32"),
    "empty sequence": (lambda d: [p.unlink() for p in (d / "JPEGImages/480p/a").iterdir()],
                       "empty sequence {d}/JPEGImages/480p/a: no .jpg frames; add them, or remove a from"),
    "a listed sequence without a folder": (lambda d: (d / "ImageSets/2017/val.txt").write_text("a\nc\n"),
                                           "empty sequence {d}/JPEGImages/480p/c"),
    "a sequence name that is a path": (lambda d: (d / "ImageSets/2017/val.txt").write_text("a\n../../b\n"),
                                       "{d}/ImageSets/2017/val.txt lists '../../b', not a sequence folder's name"),
    "a sequence of 2 frames": (lambda d: (d / "JPEGImages/480p/a/00002.jpg").unlink(),
                               "short sequence a (2 frames)"),
    "no object in the first frame": (lambda d: video.write_mask(d / "Annotations/480p/a/00000.png",
                                                                np.zeros((32, 48))),
                                     "the first annotation {d}/Annotations/480p/a/00000.png has no object"),
    "only void in the first frame": (lambda d: video.write_mask(d / "Annotations/480p/a/00000.png",
                                                                np.full((32, 48), 255)), "has no object"),
    "an RGB annotation": (lambda d: Image.new("RGB", (48, 32), (128, 0, 0)).save(d / "Annotations/480p/a/00001.png"),
                          "annotation {d}/Annotations/480p/a/00001.png has mode RGB, not object ids"),
    "not a DAVIS folder": (lambda d: (d / "JPEGImages/480p").rename(d / "JPEGImages/1080p"),
                           "{d} is not a DAVIS folder ({d}/JPEGImages/480p is missing)"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_davis_folders(case, davis):
    breaks, says = BROKEN[case]
    breaks(davis)
    code, err = contract(base(davis), davis.parent)
    assert code == 2 and says.format(d=davis) in err, err


@pytest.mark.parametrize("flags,says", [
    (["--n_last_frames", "-1"], "--n_last_frames: expected an integer >= 0, got '-1'"),
    (["--topk", "0"], "--topk: expected an integer >= 1, got '0'"),
    (["--topk", "25"], "--topk 25 exceeds the 24 patches of a frame of a (48 x 32 px, patch 8); choose at most 24"),
    (["--size_mask_neighborhood", "-2"], "--size_mask_neighborhood: expected an integer >= 0, got '-2'"),
    (["--temperature", "0"], "--temperature: expected a finite number > 0, got '0'"),
    (["--temperature", "nan"], "--temperature: expected a finite number > 0, got 'nan'"),
    (["--temperature", "-0.1"], "--temperature: expected a finite number > 0, got '-0.1'"),
    (["--temperature", "inf"], "--temperature: expected a finite number > 0, got 'inf'"),
    (["--image_size", "4"], "--image_size 4 and --patch_size 8 give 0 x 0 patches"),
    (["--image_size", "2000"], "give 250 x 250 patches"),
])
def test_flags_out_of_range(flags, says, davis):
    code, err = contract(base(davis) + flags, davis.parent)
    assert code == 2 and says in err, err


def test_the_unbroken_folder_passes(davis):
    assert contract(base(davis) + ["--topk", "24", "--temperature", "1e-300", "--n_last_frames", "0"],
                    davis.parent) == (0, "")


def test_generated_values_at_every_numeric_flag(davis):
    parser = video.get_args_parser()
    flags = [a.option_strings[0] for a in parser._actions if callable(a.type)]

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(st.lists(st.tuples(st.sampled_from(flags), values), min_size=1, max_size=3))
    def check(pairs):
        contract(base(davis) + [x for pair in pairs for x in pair], davis.parent)
    check()


@pytest.mark.parametrize("path", ["JPEGImages/480p/a/00001.jpg", "Annotations/480p/b/00000.png",
                                  "Annotations/480p/b/00002.png"])
def test_generated_bytes_at_every_file(path, davis):
    target = davis / path
    real = target.read_bytes()

    @settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(payloads(len(real)))
    def check(payload):
        write(target, payload, real)
        try:
            code, err = contract(base(davis), davis.parent)
            assert code == 0 or str(target) in err
        finally:
            target.write_bytes(real)
    check()
