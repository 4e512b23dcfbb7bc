"""09_retrieval.py: the retrieval and copy-detection protocols on cases where the answer is known, features out and
back in, the official layouts on tiny generated folders, and the bad-input contract."""
import contextlib
import csv
import io
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import load, make_image_folder
from test_train import TINY

cli = load("cli")
data = load("data")
train = load("train")
ret = load("09_retrieval")
vits = load("02_vit")

NANO = ["--random_init", "--arch", "vit_nano", "--patch_size", "8", "--image_size", "16", "--num_workers", "0"]


def nano():
    torch.manual_seed(0)
    return vits.vit_nano(patch_size=8, img_size=16).eval()


def run_cli(argv):
    """(exit code, stdout, stderr) of 09_retrieval.py with argv, in-process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.run(ret.main, ret.get_args_parser().parse_args, argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder of textures (3 classes, train/ and val/), a flat folder of photos, and a train.py checkpoint."""
    root = tmp_path_factory.mktemp("retrieval")
    make_image_folder(root / "data", (0, 1, 2), {"train": 4, "val": 3})
    (root / "flat").mkdir()
    for i, p in enumerate(sorted((root / "data" / "val").rglob("*.png"))[:5]):
        Image.open(p).convert("RGB").resize((40, 30)).save(root / "flat" / f"photo{i}.jpg", quality=95)
    dino, run = train.setup(train.parse_args(TINY + ["--data_path", str(root / "data"), "--output_dir",
                                                     str(root / "run"), "--resume", "none"]))
    torch.save(train.ckpt.checkpoint_state(dino, run.budget.config(run.args), 1, 0), root / "checkpoint.pth")
    return root


# ---------------------------------------------------------------------------- the protocol, where the answer is known
def test_an_exact_copy_is_found_at_rank_1_with_similarity_1(work, tmp_path):
    shutil.copy(work / "data" / "val" / "checker" / "1.png", tmp_path / "copy.png")
    model, tf = nano(), ret.square_transform(16)
    images = ret.folder_images(str(work / "data"), "all", tf, 16, ret.Reader())
    for kind in ("cls", "gem", "both"):
        db, kept = ret.extract(model, images, torch.device("cpu"), kind, batch_size=5)
        q, _ = ret.extract(model, ret.file_images([str(tmp_path / "copy.png")], tf, 16), torch.device("cpu"), kind)
        sims, idx = ret.search(F.normalize(q, dim=1), F.normalize(db, dim=1), k=3)
        assert images.names[kept[idx[0, 0]]].endswith("val/checker/1.png")
        assert sims[0, 0].item() == pytest.approx(1.0, abs=1e-5) and sims[0, 1] < 1 - 1e-4
    # the same through the command line, a query file outside the folder
    code, out, _ = run_cli(["neighbours"] + NANO + ["--data_path", str(work / "data"), "--queries",
                                                    str(tmp_path / "copy.png"), "--k", "2",
                                                    "--output_dir", str(tmp_path / "n")])
    lines = out.splitlines()
    first = lines[lines.index("random init:") + 1]  # the query, then its neighbours, best first
    assert code == 0 and "val/checker/1.png (1.000)" in first.split(",")[0]


def test_average_precision_perfect_and_hand_computed():
    assert ret.average_precision([0, 1, 2], 3) == 1.0
    assert ret.copy_scores(torch.tensor([[4, 0, 1], [2, 3, 4]]), [{4}, {2, 3}]) == (100.0, 100.0)
    # positives at ranks 0 and 2 of 2: 1/2 (1 + 1) / 2 + 1/2 (1/2 + 2/3) / 2 = 0.5 + 0.291666...
    assert ret.average_precision([2, 0], 2) == pytest.approx(0.5 + 7 / 24)
    # one positive at rank 1: (0 + 1/2) / 2; a positive never retrieved adds nothing
    assert ret.average_precision([1], 1) == pytest.approx(0.25)
    assert ret.average_precision([0], 2) == pytest.approx(0.5)
    mAP, top1 = ret.copy_scores(torch.tensor([[7, 3, 5], [1, 2, 3]]), [{3}, {9}])
    assert mAP == pytest.approx(100 * (0.25 + 0) / 2) and top1 == 0.0
    # revisited: junk leaves the ranking before the positives' ranks are read; a query without positives is left out
    order = np.array([5, 1, 9, 2, 3])  # junk 5 first: positives 1 and 3 at ranks 0 and 2 of what remains
    assert ret.revisited_ap(order, np.array([1, 3]), np.array([5, 9, 2])) == pytest.approx(1.0)
    assert ret.revisited_ap(order, np.array([1, 3]), np.array([5, 2])) == pytest.approx(0.5 + 7 / 24)
    assert ret.revisited_ap(order, np.array([1, 3]), np.array([5])) == pytest.approx(0.5 + 5 / 24)  # ranks 0, 3
    assert ret.revisited_ap(order, np.array([], dtype=int), np.array([5])) is None


def test_streaming_output_equals_one_shot_output(work):
    model, tf = nano(), ret.square_transform(16)
    images = ret.folder_images(str(work / "data"), "all", tf, 16, ret.Reader())
    one_shot = model(torch.stack([images[i][0] for i in range(len(images))]))  # (n, D): every image at once
    for batch_size, workers in ((1, 0), (4, 0), (len(images), 0), (3, 2)):
        feats, kept = ret.extract(model, images, torch.device("cpu"), "cls", batch_size, workers)
        assert kept.tolist() == list(range(len(images)))
        torch.testing.assert_close(feats, one_shot, atol=1e-5, rtol=1e-5)


def test_blocked_search_equals_dense_search():
    g = torch.Generator().manual_seed(0)
    db = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    db[7] = db[3]  # exact duplicates and near ones, so that ties and the threshold are exercised
    db[20] = F.normalize(db[3] + 0.01, dim=0)
    q = F.normalize(torch.randn(13, 8, generator=g), dim=1)
    dense_s, dense_i = (q @ db.T).topk(6, dim=1)
    for block in (1, 4, 13, 100):
        s, i = ret.search(q, db, 6, block=block)
        torch.testing.assert_close(s, dense_s)
        assert torch.equal(i, dense_i)
    s, i = ret.search(db[:5], db, 2, exclude=torch.arange(5), block=2)  # each leaves itself out
    assert (i != torch.arange(5)[:, None]).all()
    sim = db @ db.T
    for threshold in (0.999, 0.5, -1.0):
        a, b = torch.triu_indices(50, 50, offset=1)
        keep = sim[a, b] >= threshold
        dense = sorted(zip(a[keep].tolist(), b[keep].tolist()))
        for block in (1, 7, 50):
            i, j, s, total = ret.pairs_above(db, threshold, block=block)
            assert sorted(zip(i.tolist(), j.tolist())) == dense and total == len(dense)
            torch.testing.assert_close(s, sim[i, j])
            assert (s[:-1] >= s[1:]).all()  # strongest first
    i, j, s, total = ret.pairs_above(db, -1.0, max_pairs=10, block=3)
    assert total == 50 * 49 // 2 and len(s) == 10
    torch.testing.assert_close(s, sim[torch.triu_indices(50, 50, offset=1).unbind()].topk(10).values)


def test_gem_descriptor_and_whitening():
    tokens = torch.rand(2, 9, 4) - 0.2
    clamped = tokens.clamp(min=1e-6)
    torch.testing.assert_close(ret.gem(tokens), clamped.pow(4).mean(1).pow(0.25))
    torch.testing.assert_close(ret.gem(tokens, p=1), clamped.mean(1))
    assert (ret.gem(tokens, p=4) >= ret.gem(tokens, p=1)).all()  # power means grow with p, towards the maximum
    model, x = nano(), torch.randn(3, 3, 16, 16)
    both = ret.descriptor("both")(model, x)  # (3, 256): [CLS ; GeM]
    torch.testing.assert_close(both[:, :128], model(x))
    torch.testing.assert_close(both[:, 128:], ret.gem(model.get_intermediate_layers(x)[0][:, 1:]))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 5, generator=g) @ torch.randn(5, 5, generator=g) + 3  # correlated, off-centre
    mu, P = ret.learn_whitening(x)
    w = ret.whiten(x, mu, P)
    torch.testing.assert_close(w.mean(0), torch.zeros(5), atol=1e-4, rtol=0)
    torch.testing.assert_close(w.T @ w / len(w), torch.eye(5), atol=1e-3, rtol=0)


def test_strong_copies_are_seeded_and_of_their_kind():
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (60, 80, 3), dtype=np.uint8))
    bg = Image.new("RGB", (50, 50), (0, 255, 0))
    for kind in ret.COPY_KINDS:
        a = ret.strong_copy(img, kind, np.random.default_rng([0, 1]), bg)
        b = ret.strong_copy(img, kind, np.random.default_rng([0, 1]), bg)
        c = ret.strong_copy(img, kind, np.random.default_rng([0, 2]), bg)
        assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))
    for seed in range(20):
        crop = ret.strong_copy(img, "crop", np.random.default_rng(seed))
        assert 0.08 <= crop.width * crop.height / (80 * 60) <= 0.52  # 10-50 % of the area, up to rounding
        pasted = np.asarray(ret.strong_copy(img, "paste", np.random.default_rng(seed), bg))
        assert pasted.shape == (60, 80, 3) and (pasted == (0, 255, 0)).all(-1).mean() > 0.5  # mostly background
    assert ret.strong_copy(img, "exact", None) == img.convert("RGB")


# ---------------------------------------------------------------------------- the commands
def test_features_out_and_back_in_with_an_unreadable_file(work, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(work / "data", folder)
    (folder / "val" / "checker" / "broken.png").write_bytes(b"not a png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run_cli(["features"] + NANO + ["--data_path", str(folder), "--output_dir",
                                                        str(tmp_path / "f"), "--batch_size", "4"])
    assert code == 0, err
    assert [str(w.message).count("broken.png") for w in caught] == [2]  # named once (path and reason), skipped
    feats, names, labels = ret.load_features(tmp_path / "f")
    assert len(names) == 21 and not any("broken" in n for n in names) and feats.shape == (21, 128)
    raw = np.load(tmp_path / "f" / "features.npy")
    assert raw.dtype == np.float32 and np.allclose(np.linalg.norm(raw, axis=1), 1, atol=1e-5)
    assert labels[0] == "checker" and set(labels) == {"checker", "hstripes", "vstripes"}
    with open(tmp_path / "f" / "files.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["index", "path", "label"] and rows[1][:2] == ["0", str(folder / "train" / "checker" / "0.png")]
    # a flat folder of photos: no labels; gem needs a ViT but not labels
    code, out, err = run_cli(["features"] + NANO + ["--data_path", str(work / "flat"), "--descriptor", "both",
                                                    "--output_dir", str(tmp_path / "g")])
    assert code == 0, err
    feats, names, labels = ret.load_features(tmp_path / "g")
    assert feats.shape == (5, 256) and labels == [""] * 5 and names[0].endswith("photo0.jpg")


def test_builtin_names_open_again():
    img = ret.Reader()("textures:val:3")
    assert np.array_equal(np.asarray(img), np.asarray(data.build_dataset("textures", "val")[3][0]))


def test_neighbours_trained_next_to_random_init(work, tmp_path):
    code, out, err = run_cli(["neighbours", "--checkpoint", str(work / "checkpoint.pth"), "--data_path",
                              str(work / "data"), "--num_queries", "3", "--k", "4", "--num_workers", "0",
                              "--output_dir", str(tmp_path)])
    assert code == 0, err
    assert "random init:" in out and str(work / "checkpoint.pth") + ":" in out
    assert Image.open(tmp_path / "neighbours.png").size[0] > 500


def test_copy_detection_on_a_folder_and_duplicates(work, tmp_path):
    code, out, err = run_cli(["copies"] + NANO + ["--data_path", str(work / "data"), "--num_originals", "4",
                                                  "--whiten", "--output_dir", str(tmp_path)])
    assert code == 0, err
    assert "28 copies of 4 images, database 9, whitened on" in out
    line = out.splitlines()[-1]
    assert line.startswith("top-1 ") and line.split("copy detection mAP: ")[1].replace(".", "").isdigit()
    saved = (tmp_path / "copy_detection_random_init.json").read_text()
    code, out2, _ = run_cli(["copies"] + NANO + ["--data_path", str(work / "data"), "--num_originals", "4",
                                                 "--whiten", "--output_dir", str(tmp_path)])
    assert out2 == out and (tmp_path / "copy_detection_random_init.json").read_text() == saved  # seeded
    # duplicates: an exact copy of a file is the first pair, at 1.0
    folder = tmp_path / "flat"
    shutil.copytree(work / "flat", folder)
    shutil.copy(folder / "photo2.jpg", folder / "photo2 copy.jpg")
    code, out, err = run_cli(["duplicates"] + NANO + ["--data_path", str(folder), "--threshold", "0.9",
                                                      "--output_dir", str(tmp_path / "d")])
    assert code == 0, err
    with open(tmp_path / "d" / "duplicates.csv") as f:
        rows = list(csv.DictReader(f))
    assert {Path(rows[0]["path_a"]).name, Path(rows[0]["path_b"]).name} == {"photo2.jpg", "photo2 copy.jpg"}
    assert float(rows[0]["similarity"]) == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "d" / "duplicates.png").is_file()


# ---------------------------------------------------------------------------- the official layouts, tiny
def test_copydays_layout(work, tmp_path):
    root = tmp_path / "copydays"
    val = sorted((work / "data" / "val").rglob("*.png"))
    for sub in ("original", "strong", "jpegqual/3"):
        (root / sub).mkdir(parents=True)
    for i, p in enumerate(val[:4]):
        img = Image.open(p).convert("RGB")
        img.save(root / "original" / f"20{i}000.jpg", quality=95)
        img.save(root / "jpegqual" / "3" / f"20{i}000.jpg", quality=95)
        for c in range(1 + i % 2):  # Copydays: some originals have several strong copies
            shutil.copy(root / "original" / f"20{i}000.jpg", root / "strong" / f"20{i}00{c + 1}.jpg")
    for name, files in (("yfcc", val[4:]), ("whit", sorted((work / "data" / "train").rglob("*.png")))):
        (tmp_path / name).mkdir()
        for j, p in enumerate(files):
            Image.open(p).convert("RGB").save(tmp_path / name / f"{j}.jpg")
    code, out, err = run_cli(["copydays"] + NANO + ["--data_path", str(root), "--distractors", str(tmp_path / "yfcc"),
                                                    "--whitening", str(tmp_path / "whit"), "--output_dir",
                                                    str(tmp_path / "out")])
    assert code == 0, err
    assert "strong: mAP 100.0  top-1 100.0  (6 queries)" in out and "jpegqual/3: mAP 100.0" in out
    assert out.splitlines()[-1] == "copy detection mAP: 100.0"


@pytest.mark.parametrize("arrays", [False, True])
def test_revisited_layout(work, tmp_path, arrays):
    base = tmp_path / "roxford5k"
    (base / "jpg").mkdir(parents=True)
    val = sorted((work / "data" / "val").rglob("*.png"))
    for i, p in enumerate(val[:6]):
        Image.open(p).convert("RGB").resize((48, 32)).save(base / "jpg" / f"db{i}.jpg", quality=95)
    shutil.copy(base / "jpg" / "db0.jpg", base / "jpg" / "q0.jpg")
    shutil.copy(base / "jpg" / "db3.jpg", base / "jpg" / "q1.jpg")
    ints = (lambda *v: np.array(v, dtype=np.int64)) if arrays else (lambda *v: list(v))
    # q0: its copy is an easy positive; q1: its copy is hard, image 0 junk. Hard protocol: q0 has no positive
    gnd = [{"easy": ints(0), "hard": ints(), "junk": ints(), "bbx": [0, 0, 10, 10]},
           {"easy": ints(), "hard": ints(3), "junk": ints(0), "bbx": [0, 0, 10, 10]}]
    with open(base / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": [f"db{i}" for i in range(6)], "qimlist": ["q0", "q1"], "gnd": gnd}, f)
    code, out, err = run_cli(["revisited"] + NANO + ["--image_size", "48", "--data_path", str(tmp_path),
                                                     "--output_dir", str(tmp_path / "out"), "--multiscale"])
    assert code == 0, err
    assert out.splitlines()[-1] == "roxford5k mAP: M 100.0, H 100.0"


# ---------------------------------------------------------------------------- bad input
def snapshot(root):
    return {p: (s.st_size, s.st_mtime_ns) for p in root.rglob("*") for s in [p.stat()]}


def contract(argv, root, expected):
    """Run argv; assert one `error:` line naming `expected`, exit code 2, and nothing written under root."""
    before = snapshot(root)
    code, _, err = run_cli(argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert expected in err, err
    assert snapshot(root) == before
    return err


def test_bad_input(work, tmp_path):
    out = ["--output_dir", str(tmp_path / "out")]
    (tmp_path / "empty").mkdir()
    contract(["features"] + NANO + ["--data_path", str(tmp_path / "empty")] + out, tmp_path, "no images in")
    (tmp_path / "junk" / "a").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "junk" / "a" / f"{i}.png").write_bytes(b"not a png")
    contract(["features"] + NANO + ["--data_path", str(tmp_path / "junk")] + out, tmp_path, "unreadable")
    (tmp_path / "notes.txt").write_text("hello")
    contract(["neighbours"] + NANO + ["--data_path", str(work / "data"), "--queries", str(tmp_path / "notes.txt")]
             + out, tmp_path, "notes.txt")
    contract(["neighbours"] + NANO + ["--data_path", str(work / "flat"), "--k", "5"] + out, tmp_path,
             "--k 5 is more than the 4 other images")
    for t in ("1.5", "-1.01", "nan"):
        contract(["duplicates"] + NANO + ["--data_path", str(work / "flat"), "--threshold", t] + out, tmp_path,
                 "a cosine similarity in [-1, 1]")
    contract(["features"] + NANO + ["--data_path", str(work / "flat"), "--output_dir", str(tmp_path / "notes.txt")],
             tmp_path, "is an existing file")
    contract(["features", "--raw_pixels", "--descriptor", "gem", "--data_path", str(work / "flat")] + out, tmp_path,
             "--descriptor gem")
    contract(["copies", "--raw_pixels", "--whiten", "--data_path", str(work / "data")] + out, tmp_path,
             "whitening 150528-dimensional features")
    contract(["features"] + NANO + ["--data_path", str(work / "flat"), "--split", "val"] + out, tmp_path,
             "--split val needs")
    # a features folder whose two files disagree, or are not what `features` writes
    code = run_cli(["features"] + NANO + ["--data_path", str(work / "flat"), "--output_dir", str(tmp_path / "f")])[0]
    assert code == 0
    np.save(tmp_path / "f" / "features.npy", np.ones((4, 128), np.float32))
    contract(["duplicates", "--features", str(tmp_path / "f")] + out, tmp_path, "does not match")
    np.save(tmp_path / "f" / "features.npy", np.array([{"a": 1}] * 5, dtype=object))
    contract(["duplicates", "--features", str(tmp_path / "f")] + out, tmp_path, "not a readable .npy")
    np.save(tmp_path / "f" / "features.npy", np.ones((5, 128), np.float32))
    (tmp_path / "f" / "files.csv").write_text("a,b\n1,2\n")
    contract(["duplicates", "--features", str(tmp_path / "f")] + out, tmp_path, "not a files list")
    contract(["duplicates", "--features", str(tmp_path / "nowhere")] + out, tmp_path, "does not exist")
    # the official layouts
    contract(["copydays"] + NANO + ["--data_path", str(work / "flat")] + out, tmp_path, "not laid out as Copydays")
    contract(["revisited"] + NANO + ["--data_path", str(work / "flat")] + out, tmp_path, "gnd_roxford5k.pkl")


def test_a_ground_truth_pickle_runs_nothing(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))
    (tmp_path / "victim").mkdir()
    (tmp_path / "roxford5k").mkdir()
    with open(tmp_path / "roxford5k" / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": ["a"], "qimlist": ["a"], "gnd": [Exploit()]}, f)
    with pytest.raises(data.DataError, match="shutil.rmtree is not allowed"):
        ret.revisited_ground_truth(tmp_path, "roxford5k")
    assert (tmp_path / "victim").is_dir()
