"""The small real datasets are rebuilt identically, offline, as ImageFolders with train/ and val/."""
import hashlib

from conftest import load

data = load("data")


def digest(root):
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_digits_are_rebuilt_identically(tmp_path):
    data.MAKERS["digits"](tmp_path / "a")
    data.MAKERS["digits"](tmp_path / "b")
    a = digest(tmp_path / "a")
    assert a == digest(tmp_path / "b") and len(a) == 1797
    assert sum(k.startswith("val/") for k in a) == 359  # every fifth image
    train = data.build_dataset(str(tmp_path / "a"), "train")
    assert train.classes == [str(d) for d in range(10)] and train[0][0].size == (8, 8)


def test_crops_of_real_photographs_are_rebuilt_identically(tmp_path):
    for name, sources in (("photos", data._photos()), ("surfaces", data._gray_surfaces())):
        for copy in "ab":
            data._write_crops(sources, tmp_path / name / copy, 5, (0.1, 0.3), "png")
        a = digest(tmp_path / name / "a")
        assert a == digest(tmp_path / name / "b") and len(a) == 5 * len(sources)
    assert len(data._photos()) == 11 and len(data._gray_surfaces()) == 7
    assert data.has_val(str(tmp_path / "photos" / "a")) and not data.has_val(str(tmp_path / "photos" / "a" / "train"))
