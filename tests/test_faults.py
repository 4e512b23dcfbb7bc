"""Bad input gets one clear line and exit code 2, with nothing overwritten; faults lose no work."""
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace

import numpy as np
import pytest
import torch

from conftest import ROOT, load, png_claiming
from test_train import TINY

train = load("train")
ckpt = load("checkpoint")
losses = load("04_loss")
data = load("data")


def cli(argv, capsys):
    code = train.cli(argv)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """A finished 1-epoch run whose files must survive every bad invocation below."""
    out = tmp_path_factory.mktemp("run")
    assert train.cli(TINY + ["--data_path", str(folder), "--output_dir", str(out), "--epochs", "1",
                             "--warmup_epochs", "0"]) == 0
    return out


def one_line(code, err, expected):
    """The contract: exit code 2 and exactly one line, starting `error:`, saying `expected`."""
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, err


def last_line(code, err, expected):
    """After work has started (progress bars, notes): exit code 2, no traceback, and the contract's line last."""
    assert code == 2 and "Traceback" not in err and err.splitlines()[-1].startswith("error: ") \
        and expected in err.splitlines()[-1], err


HOW_TO_PROCEED = "resume with the same flags, or start afresh with --resume none or a new --output_dir"


@pytest.mark.parametrize("extra,expected", [
    (["--arch", "vit_huge"], "--arch: invalid choice: 'vit_huge'"),
    (["--patch_size", "5"], "does not divide --global_size 16"),
    (["--local_crops_number", "-1"], "--local_crops_number: expected an integer >= 0, got '-1'"),
    (["--batch_size_per_gpu", "64"], "fewer than one batch of 64"),
    (["--local_size", "1032"], "--local_size 1032 is 129 patches of 8 px per side, more than 128"),
    (["--data_path", "/nonexistent/images"], "neither a directory nor a built-in dataset"),
    # resuming with other flags: the network, the head, the optimizer
    (["--out_dim", "64"], f"was trained with --out_dim 32, this run has 64; {HOW_TO_PROCEED}"),
    (["--arch", "vit_tiny"], f"was trained with --arch vit_nano, this run has vit_tiny; {HOW_TO_PROCEED}"),
    (["--use_bn_in_head", "true"], "was trained with --use_bn_in_head False, this run has True"),
    (["--optimizer", "sgd"], "was trained with --optimizer adamw, this run has sgd"),  # once: KeyError 'step'
])
def test_bad_arguments_fail_clearly_and_keep_files(extra, expected, folder, trained, capsys):
    before = {p.name: p.read_bytes() for p in trained.iterdir()}
    code, err = cli(TINY + ["--data_path", str(folder), "--output_dir", str(trained)] + extra, capsys)
    one_line(code, err, expected)
    assert {p.name: p.read_bytes() for p in trained.iterdir()} == before


def test_a_mid_epoch_checkpoint_resumes_only_with_its_batch_size(folder, trained, tmp_path, capsys):
    state = torch.load(trained / "checkpoint.pth", weights_only=True)
    state["epoch"], state["step"] = 0, 1  # stopped after one batch of 4: the sampler skips 4 images
    (tmp_path / "o").mkdir()
    torch.save(state, tmp_path / "o" / "checkpoint.pth")
    before = (tmp_path / "o" / "checkpoint.pth").read_bytes()
    code, err = cli(TINY + ["--data_path", str(folder), "--output_dir", str(tmp_path / "o"), "--batch_size_per_gpu",
                            "2"], capsys)  # once: UnboundLocalError, after config.json was overwritten
    one_line(code, err, f"was trained with --batch_size_per_gpu 4 and stopped mid-epoch, this run has 2; "
                        f"{HOW_TO_PROCEED}")
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["checkpoint.pth"]
    assert (tmp_path / "o" / "checkpoint.pth").read_bytes() == before


def test_a_run_on_other_data_starts_afresh_instead_of_continuing_the_last_one(folder, trained, tmp_path, capsys):
    import shutil
    other = shutil.copytree(folder, tmp_path / "other")  # the same images at another path: another folder to a user
    before = {p.name: p.read_bytes() for p in trained.iterdir()}
    argv = TINY + ["--data_path", str(other), "--epochs", "1", "--warmup_epochs", "0"]
    code, err = cli(argv + ["--output_dir", str(trained)], capsys)
    one_line(code, err, f"{trained / 'checkpoint.pth'} was trained on --data_path {folder}, this run reads {other}; "
                        f"give this run its own --output_dir (or, to continue that run on this data, --resume ")
    assert {p.name: p.read_bytes() for p in trained.iterdir()} == before
    # named with --resume, it continues on the new path: here it has all its epochs, and says so
    assert train.cli(argv + ["--output_dir", str(tmp_path / "o"), "--resume", str(trained / "checkpoint.pth")]) == 0
    assert "nothing to train: " in capsys.readouterr().out


def test_a_mid_epoch_checkpoint_from_longer_epochs_is_refused(folder, trained, tmp_path, capsys):
    state = torch.load(trained / "checkpoint.pth", weights_only=True)
    state["epoch"], state["step"] = 0, 5  # stopped at iteration 5 of an epoch; here an epoch has 3
    (tmp_path / "o").mkdir()
    torch.save(state, tmp_path / "o" / "checkpoint.pth")
    code, err = cli(TINY + ["--data_path", str(folder), "--output_dir", str(tmp_path / "o")], capsys)
    one_line(code, err, f"stopped at iteration 5 of an epoch, and this run's epochs have 3; resume with the flags")
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["checkpoint.pth"]  # once: UnboundLocalError


def test_the_demo_scripts_name_a_bad_path(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    for script, argv, says in [("data.py", ["--make", "photos", str(tmp_path / "file")], "is not an empty directory"),
                               ("data.py", ["--make", "digits", str(tmp_path / "file" / "digits")],  # once a traceback
                                f"cannot write to DIR {tmp_path / 'file' / 'digits'} ({tmp_path / 'file'} is not a "
                                f"writable directory)"),
                               ("01_multicrop.py", [str(tmp_path / "missing.jpg")], "cannot read")]:
        r = subprocess.run([sys.executable, script] + argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and len(r.stderr.splitlines()) == 1 and says in r.stderr, r.stderr


def test_empty_and_imageless_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noimg" / "class_a").mkdir(parents=True)
    (tmp_path / "noimg" / "class_a" / "notes.txt").write_text("not an image")
    for d in ("empty", "noimg"):
        code, err = cli(TINY + ["--data_path", str(tmp_path / d), "--output_dir", str(tmp_path / "o")], capsys)
        assert code == 2 and "no images in" in err and "Traceback" not in err
        assert not (tmp_path / "o").exists()  # bad input creates nothing, not even the output directory


def test_a_folder_without_class_folders_trains_and_names_the_files_left_out(tmp_path, capsys):
    photos, rng = tmp_path / "photos", np.random.RandomState(0)
    photos.mkdir()
    for i in range(8):  # images straight in the folder, as a camera or phone leaves them, and an iPhone's HEIC
        data.draw_texture(rng, i % 2, 32).save(photos / f"IMG_{i}.png")
    for name in ("IMG_8.HEIC", "IMG_9.heic", "notes.txt", ".DS_Store"):
        (photos / name).write_bytes(b"\0")
    code, err = cli(TINY + ["--data_path", str(photos), "--output_dir", str(tmp_path / "o"), "--epochs", "1"], capsys)
    assert code == 0 and (tmp_path / "o" / "checkpoint.pth").exists()
    assert "(not images it can read): 2 .heic, 1 .txt; convert the HEIC photos to JPEG" in err
    for f in photos.glob("IMG_*.png"):
        f.unlink()
    code, err = cli(TINY + ["--data_path", str(photos), "--output_dir", str(tmp_path / "p")], capsys)
    assert code == 2 and "no images in" in err and "(2 .heic, 1 .txt); convert the HEIC photos to JPEG" in err
    assert "Traceback" not in err and not (tmp_path / "p").exists()


def test_bad_resume_files(tmp_path, folder, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(1000))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")  # once: IndexError on the empty message of the EOFError
    text = tmp_path / "text.pth"
    text.write_text("hello")  # once: KeyError from the weights-only unpickler
    pickled = tmp_path / "pickled.pth"
    torch.save({"student": {}, "args": Namespace(arch="vit_small"), "hook": print}, pickled)  # a function: code
    weights = tmp_path / "backbone.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 8)}, weights)
    for path, expected in ((junk, "is not a"), (empty, "empty.pth is not a readable PyTorch checkpoint (EOFError"),
                           (text, "text.pth is not a readable PyTorch checkpoint (KeyError"),
                           (pickled, "weights_only=True) refuses"), (weights, "is not a train.py checkpoint"),
                           (tmp_path / "missing.pth", "does not exist")):
        code, err = cli(TINY + ["--data_path", str(folder), "--output_dir", str(tmp_path / "o"),
                                "--resume", str(path)], capsys)
        one_line(code, err, expected)
        assert not (tmp_path / "o").exists()  # not even an empty directory


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_folder_of_unreadable_images_is_one_line_and_writes_nothing(tmp_path, workers, capsys):
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "a" / "0.png").write_bytes(b"not a png")
    (tmp_path / "data" / "a" / "1.png").write_bytes(png_claiming(30000, 30000))  # PIL's DecompressionBombError
    code, err = cli(TINY + ["--data_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "o"),
                            "--num_workers", workers], capsys)
    one_line(code, err, "the first images in")
    assert "1.png (DecompressionBombError" in err and not (tmp_path / "o").exists()


def test_unwritable_output_dir_fails_before_training(tmp_path, folder, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = cli(TINY + ["--data_path", str(folder), "--output_dir", str(blocker / "run")], capsys)
    assert code == 2 and "cannot write to --output_dir" in err


def test_offline_download_names_the_fix(tmp_path):
    env = dict(os.environ, DINO_DATA=str(tmp_path / "cache"), HTTPS_PROXY="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
    r = subprocess.run([sys.executable, "train.py"] + TINY + ["--data_path", "cifar10", "--output_dir",
                       str(tmp_path / "o")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "cannot get cifar10" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_corrupt_image_is_skipped_with_a_warning_naming_it(folder, tmp_path, capsys):
    import shutil
    data_dir = tmp_path / "data"
    shutil.copytree(folder / "train", data_dir / "train")
    bad = data_dir / "train" / "hstripes" / "broken.png"
    bad.write_bytes((data_dir / "train" / "hstripes" / "0.png").read_bytes()[:60])  # truncated
    with pytest.warns(UserWarning, match="skipping unreadable image .*broken.png"):
        code, _ = cli(TINY + ["--data_path", str(data_dir), "--output_dir", str(tmp_path / "o"), "--epochs", "1",
                              "--warmup_epochs", "0"], capsys)
    assert code == 0


@pytest.mark.parametrize("ctrl_c", [False, True])  # True: Ctrl-C arrives in the failing step, between log points
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(folder, tmp_path, capsys, monkeypatch,
                                                                             ctrl_c):
    out = tmp_path / "o"
    assert train.cli(TINY + ["--data_path", str(folder), "--output_dir", str(out), "--epochs", "1",
                             "--warmup_epochs", "0"]) == 0
    good = (out / "checkpoint.pth").read_bytes()
    forward = losses.DINOLoss.forward
    signals = [signal.SIGINT] if ctrl_c else []

    def exploding(self, *a, **k):
        loss, diag = forward(self, *a, **k)
        if signals:
            os.kill(os.getpid(), signals.pop())
        return loss * float("nan"), diag
    monkeypatch.setattr(losses.DINOLoss, "forward", exploding)
    code, err = cli(TINY + ["--data_path", str(folder), "--output_dir", str(out), "--epochs", "3",
                            "--warmup_epochs", "0"], capsys)
    assert code == 1 and "not finite at iteration 3" in err and "checkpoint.pth" in err
    assert (out / "checkpoint.pth").read_bytes() == good


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_to_the_process_group_checkpoints_and_resume_continues(folder, tmp_path, sig):
    """scancel, preemption, systemd and timeout signal every process of the group, the loader's workers too;
    SLURM's --signal sends SIGUSR1 ahead of a time limit. Once, a worker died of it and took the run along."""
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "train.py"] + TINY + ["--data_path", str(folder), "--output_dir", str(out),
                            "--epochs", "1000", "--num_workers", "1"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while not (out / "log.txt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, sig)  # the whole group: the main process and its worker
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and sig.name in err and "the same command resumes" in err, err
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["epoch"] * 3 + state["step"] >= 3  # at least the first epoch is in it
    # the same command (here: one more epoch) continues from the saved iteration and finishes
    r = subprocess.run([sys.executable, "train.py"] + TINY + ["--data_path", str(folder), "--output_dir", str(out),
                       "--epochs", str(state["epoch"] + 1), "--num_workers", "1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert f"resumed from {out / 'checkpoint.pth'} at epoch {state['epoch']}, iteration {state['step']}" in r.stdout
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == state["epoch"] + 1

KILLER = """
import sys, torch
sys.path.insert(0, {root!r})
import checkpoint
big = {{"w": torch.randn(4_000_000)}}
checkpoint.save_atomic({{"epoch": 0, **big}}, {path!r})
print("ready", flush=True)
for epoch in range(1, 10_000):
    checkpoint.save_atomic({{"epoch": epoch, **big}}, {path!r})
"""


def test_kill_9_during_save_leaves_the_last_complete_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth"
    rng = np.random.RandomState(0)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", KILLER.format(root=str(ROOT), path=str(path))],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.5))  # somewhere inside one of the saves
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = torch.load(path, weights_only=True)
        assert state["w"].shape == (4_000_000,) and isinstance(state["epoch"], int)


# ---------------------------------------------------------------------------- the world as bad input
def copy_of(trained, tmp_path):
    import shutil
    return shutil.copytree(trained, tmp_path / "run")


def texture_images(folder, n, label=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(label)
    for i in range(n):
        data.draw_texture(rng, label, 16).save(folder / f"{i}.png")


def test_a_link_loop_in_an_image_folder_is_cut_and_named(tmp_path, capsys):
    """`ln -s . loop` in a class folder once counted each of its images 41 times, in training and evaluation."""
    root = tmp_path / "data"
    for split, n in (("train", 3), ("val", 2)):
        for label, cls in enumerate(("a", "b")):
            texture_images(root / split / cls, n, label)
    (root / "train" / "a" / "loop").symlink_to(".")  # back to itself
    (root / "train" / "b" / "up").symlink_to("../..")  # back to the root
    (root / "train" / "b" / "again").symlink_to("../a")  # a folder read already
    for split in ("pretrain", "train"):
        ds = data.build_dataset(str(root), split)
        assert len(ds) == 6 and ds.classes == ["a", "b"], (split, len(ds))
    err = capsys.readouterr().err
    assert f"{root / 'train' / 'a' / 'loop'} (a link back to {root / 'train' / 'a'}: a loop)" in err
    assert f"{root / 'train' / 'b' / 'up'} (a link back to {root}: a loop)" in err
    assert f"{root / 'train' / 'b' / 'again'} (a link to {root / 'train' / 'a'}, read already)" in err


def test_hidden_folders_are_left_out(tmp_path):
    photos = tmp_path / "photos"
    texture_images(photos, 4)
    (photos / ".ipynb_checkpoints").mkdir()  # what Jupyter leaves: once "no images"
    assert len(data.build_dataset(str(photos), "pretrain")) == 4
    labelled = tmp_path / "labelled"
    for label, cls in enumerate(("a", "b")):
        texture_images(labelled / "train" / cls, 2, label)
    (labelled / "train" / ".ipynb_checkpoints").mkdir()  # once a class of its own, with no images: an error
    assert data.build_dataset(str(labelled), "train").classes == ["a", "b"]


def test_a_flat_folder_with_a_subfolder_trains_on_all_its_images(tmp_path, capsys):
    photos = tmp_path / "photos"
    texture_images(photos, 4)
    texture_images(photos / "edited", 2, label=1)  # once: the 2 images of the subfolder alone, without a word
    ds = data.build_dataset(str(photos), "pretrain")
    assert len(ds) == 6 and ds.classes == [""]
    assert f"note: {photos} holds images beside its folders (edited): all 6 images under it" in capsys.readouterr().err


def test_special_files_are_skipped_with_their_name(tmp_path, capsys):
    """A FIFO named like an image blocked the run forever at its first read."""
    root = tmp_path / "data"
    texture_images(root / "a", 3)
    os.mkfifo(root / "a" / "z.png")
    (root / "a" / "zz.png").symlink_to(tmp_path / "missing.png")
    ds = data.build_dataset(str(root), "pretrain")
    assert [os.path.basename(p) for p, _ in ds.samples] == ["0.png", "1.png", "2.png"]
    err = capsys.readouterr().err
    assert f"{root / 'a' / 'z.png'} (not a regular file)" in err and f"{root / 'a' / 'zz.png'} (a broken link)" in err


def test_content_not_extension_chooses_the_decoder(tmp_path):
    """A 16-bit PNG named .jpg was decoded white in the training crops and right in the evaluations."""
    from PIL import Image
    images, fast = load("images"), load("multicrop_fast")
    Image.fromarray(np.full((32, 32), 30000, np.uint16)).save(tmp_path / "deep.jpg", format="PNG")  # gray 117
    Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(tmp_path / "photo.png", format="JPEG")
    geometry = fast.MultiCropGeometry(local_crops_number=0, global_size=16)
    crops = geometry(images.path_if_jpeg(tmp_path / "deep.jpg"))  # the training path
    evaluated = np.asarray(data.open_image(tmp_path / "deep.jpg"))  # the evaluations' path
    assert crops[0].float().mean().item() == evaluated.mean() == 117  # once 255 in the crops
    assert images.path_if_jpeg(tmp_path / "photo.png") == tmp_path / "photo.png"  # a JPEG: decoded by the crops


def linear(argv, capsys):
    lin = load("08_linear")
    code = load("cli").run(lin.main, lin.get_args_parser().parse_args,
                           ["--raw_pixels", "--image_size", "16", "--num_workers", "0", "--epochs", "1",
                            "--precomputed"] + argv)
    return (code,) + capsys.readouterr()


def test_linear_probe_batch_larger_than_the_training_set_scales_the_lr_by_the_real_batch(folder, tmp_path, capsys):
    """Batch 10^7 once scaled the lr by 10^7 / 256 while each step saw the 12 images."""
    import json
    code, out, _ = linear(["--data_path", str(folder), "--batch_size_per_gpu", "10000000", "--output_dir",
                           str(tmp_path / "o")], capsys)
    assert code == 0 and "note: --batch_size_per_gpu 10000000 is more than the 12 training images" in out
    assert json.loads((tmp_path / "o" / "linear_raw_pixels.json").read_text())["lr"] == pytest.approx(0.001 * 12 / 256)


def test_linear_probe_on_one_class_is_refused(tmp_path, capsys):
    """Once 100 % top-1, as if it meant something."""
    one = tmp_path / "one"
    for split in ("train", "val"):
        texture_images(one / split / "hstripes", 3)
    code, _, err = linear(["--data_path", str(one), "--output_dir", str(tmp_path / "p")], capsys)
    one_line(code, err, f"the training images of {one} are of one class (hstripes); a linear probe needs at least two")
    assert not (tmp_path / "p").exists()


def test_linear_probe_without_val_does_not_speak_of_knn(tmp_path, capsys):
    texture_images(tmp_path / "noval" / "train" / "a", 2)
    texture_images(tmp_path / "noval" / "train" / "b", 2, label=1)
    code, _, err = linear(["--data_path", str(tmp_path / "noval")], capsys)
    one_line(code, err, "has no val/ folder; the evaluations need ROOT/train and ROOT/val")
    assert "k-NN" not in err


def test_an_empty_output_dir_is_refused(folder, tmp_path, capsys, monkeypatch):
    """--output_dir '' once wrote two checkpoints, config.json, log.txt and curves.png into the current directory."""
    monkeypatch.chdir(tmp_path)
    code, err = cli(TINY + ["--data_path", str(folder), "--output_dir", ""], capsys)
    one_line(code, err, "argument --output_dir: expected a directory, got '' (for the current directory, pass .)")
    knn = load("06_knn")
    code = load("cli").run(knn.main, knn.get_args_parser().parse_args, ["--raw_pixels", "--output_dir", " "])
    one_line(code, capsys.readouterr().err, "argument --output_dir: expected a directory, got ' '")
    assert list(tmp_path.iterdir()) == []


def test_a_resume_with_other_flags_keeps_every_configuration(folder, trained, tmp_path, capsys):
    import json
    out = copy_of(trained, tmp_path)
    first = (out / "config.json").read_text()
    code, err = cli(TINY + ["--data_path", str(folder), "--output_dir", str(out), "--epochs", "2",
                            "--warmup_epochs", "0", "--teacher_temp", "0.05"], capsys)
    assert code == 0
    assert "note: flags changed since the last start: --teacher_temp 0.04 -> 0.05, --epochs 1 -> 2, " in err
    assert f"that start's configuration is kept in {out / 'config_1.json'}" in err
    assert (out / "config_1.json").read_text() == first and json.loads(first)["teacher_temp"] == 0.04
    assert json.loads((out / "config.json").read_text())["teacher_temp"] == 0.05


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_process_group_variables_without_peers_end_in_bounded_time(folder, tmp_path, capsys, monkeypatch, rank):
    """WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT left in the environment: once a run that waited forever."""
    monkeypatch.setattr(train.runtime, "PEERS_WAIT_S", 1)
    for k, v in dict(WORLD_SIZE="2", RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    t0 = time.monotonic()
    code, err = cli(TINY + ["--data_path", str(folder), "--output_dir", str(tmp_path / "o")], capsys)
    assert time.monotonic() - t0 < 30
    one_line(code, err, "did not all join within 1 s")
    assert "launch it with torchrun" in err and "unset WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT" in err
    assert not (tmp_path / "o").exists()


def test_a_world_size_without_the_rest_of_torchrun_is_one_line(folder, tmp_path, capsys, monkeypatch):
    """WORLD_SIZE=2 LOCAL_RANK=0 alone: once a ValueError traceback."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    code, err = cli(TINY + ["--data_path", str(folder), "--output_dir", str(tmp_path / "o")], capsys)
    one_line(code, err, "WORLD_SIZE=2 is set but not RANK, MASTER_ADDR, MASTER_PORT: this is not a torchrun launch")
    assert not (tmp_path / "o").exists()


def disk_with(free, monkeypatch):
    import shutil
    usage = shutil.disk_usage

    def fake(path):
        return usage(path)._replace(free=free)
    monkeypatch.setattr(shutil, "disk_usage", fake)


def test_a_disk_without_room_for_a_checkpoint_is_found_before_training(folder, tmp_path, capsys, monkeypatch):
    disk_with(2 << 20, monkeypatch)  # 2 MiB: a probe fits, a checkpoint does not
    code, err = cli(TINY + ["--data_path", str(folder), "--output_dir", str(tmp_path / "o")], capsys)
    one_line(code, err, f"--output_dir {tmp_path / 'o'} has 2 MiB free, and a checkpoint of this run needs")
    assert not (tmp_path / "o").exists()


def test_an_evaluation_on_a_full_disk_ends_before_its_work(folder, tmp_path, capsys, monkeypatch):
    disk_with(0, monkeypatch)
    knn = load("06_knn")
    code = load("cli").run(knn.main, knn.get_args_parser().parse_args,
                           ["--raw_pixels", "--data_path", str(folder), "--output_dir", str(tmp_path / "k")])
    one_line(code, capsys.readouterr().err, f"cannot write to --output_dir {tmp_path / 'k'}: the disk of")


def enospc(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_a_full_disk_while_saving_keeps_the_last_checkpoint_and_no_temporary_file(folder, trained, tmp_path, capsys,
                                                                                monkeypatch):
    """A full disk at the checkpoint once ended in torch's `unexpected pos` traceback."""
    out = copy_of(trained, tmp_path)
    good = (out / "checkpoint.pth").read_bytes()
    save = torch.save

    def full(obj, f, *a, **k):  # the first bytes go, then the disk is full
        f.write(b"PK\x03\x04")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4 vs 0")
    monkeypatch.setattr(torch, "save", full)
    code, err = cli(TINY + ["--data_path", str(folder), "--output_dir", str(out), "--epochs", "2",
                            "--warmup_epochs", "0"], capsys)
    last_line(code, err, f"error: cannot write {out / 'checkpoint.pth'} ([enforce fail at inline_container.cc:672] "
                         f". unexpected pos 4 vs 0); the checkpoint.pth there is unchanged; free some space")
    assert (out / "checkpoint.pth").read_bytes() == good and not list(out.glob(".*tmp"))
    monkeypatch.setattr(torch, "save", save)  # space again: the same command continues
    assert cli(TINY + ["--data_path", str(folder), "--output_dir", str(out), "--epochs", "2",
                       "--warmup_epochs", "0"], capsys)[0] == 0
    assert [r["epoch"] for r in map(__import__("json").loads, (out / "log.txt").read_text().splitlines())] == [0, 1]


def test_a_full_disk_at_an_evaluations_results_leaves_no_temporary_file(folder, tmp_path, capsys, monkeypatch):
    """06_knn.py once computed everything, then raised OSError and left a 0-byte .tmp file."""
    monkeypatch.setattr(os, "fsync", enospc)  # the disk fills as the results are written
    knn = load("06_knn")
    code = load("cli").run(knn.main, knn.get_args_parser().parse_args,
                           ["--raw_pixels", "--image_size", "16", "--num_workers", "0", "--data_path", str(folder),
                            "--output_dir", str(tmp_path / "k")])
    last_line(code, capsys.readouterr().err, f"cannot write {tmp_path / 'k' / 'knn_raw_pixels.json'} (No space left "
                                             f"on device); nothing was written")
    assert list((tmp_path / "k").iterdir()) == []


def test_make_on_a_full_disk_leaves_no_half_written_folder(tmp_path, monkeypatch):
    """`data.py --make` once left a half-written folder that then blocked the next try."""
    from PIL import Image
    makers = load("makers")
    save, calls = Image.Image.save, []

    def filling(self, *a, **k):
        calls.append(1)
        return save(self, *a, **k) if len(calls) < 20 else enospc()
    monkeypatch.setattr(Image.Image, "save", filling)
    with pytest.raises(ckpt.WriteError, match="No space left on device"):
        makers.make("digits", tmp_path / "sets" / "digits")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary one


def test_make_into_a_read_only_place_is_refused(tmp_path, monkeypatch):
    makers, cli_ = load("makers"), load("cli")
    monkeypatch.setattr(cli_.os, "access", lambda *a: False)  # a read-only place (root may write anywhere)
    with pytest.raises(cli_.UsageError, match="is not a writable directory"):
        makers.make("digits", tmp_path / "digits")


def test_a_cut_last_log_line_is_repaired_on_resume(folder, trained, tmp_path, capsys):
    """A kill or a full disk during an append once left a log.txt that blocked every resume (JSONDecodeError)."""
    import json
    out = copy_of(trained, tmp_path)
    with open(out / "log.txt", "a") as f:
        f.write('{"loss": 4.1, "entr')
    code, err = cli(TINY + ["--data_path", str(folder), "--output_dir", str(out), "--epochs", "2",
                            "--warmup_epochs", "0"], capsys)
    assert code == 0 and f"note: dropped line 2 of {out / 'log.txt'}: not a whole row" in err
    assert [json.loads(r)["epoch"] for r in (out / "log.txt").read_text().splitlines()] == [0, 1]


def test_hub_entry_with_another_patch_size(tmp_path):
    with pytest.raises(ValueError, match="dino_vits16 was trained with patch_size=16, not 8; load dino_vits8 instead"):
        torch.hub.load(str(ROOT), "dino_vits16", patch_size=8, source="local")  # once: a TypeError, "multiple values"
    model = torch.hub.load(str(ROOT), "dino_vits16", pretrained=False, patch_size=8, source="local")
    assert model.patch_embed.patch_size == 8


def test_hub_official_entries_not_here_say_where_they_are():
    with pytest.raises(ValueError, match=r"torch.hub.load\('facebookresearch/dino:main', 'dino_resnet50'\)"):
        torch.hub.load(str(ROOT), "dino_resnet50", source="local")  # once torch.hub's "Cannot find callable"


def test_hub_offline_names_the_python_way(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(ckpt.RELEASED, "dino_vits8", ("vit_small", 8, (tmp_path / "nowhere.pth").as_uri()))
    with pytest.raises(ckpt.CheckpointError, match="pretrained=False and load that file into it") as e:
        torch.hub.load(str(ROOT), "dino_vits8", source="local")
    assert "--pretrained" not in str(e.value)  # a flag of the command lines


def test_resume_from_a_directory_says_so(folder, trained, tmp_path, capsys):
    code, err = cli(TINY + ["--data_path", str(folder), "--output_dir", str(tmp_path / "o"), "--resume",
                            str(trained)], capsys)  # once: "does not exist"
    one_line(code, err, f"{trained} is a directory; pass the checkpoint file in it (e.g. {trained / 'checkpoint.pth'})")


def test_knn_reports_the_k_it_used(folder, tmp_path, capsys):
    import json
    knn = load("06_knn")
    code = load("cli").run(knn.main, knn.get_args_parser().parse_args,
                           ["--raw_pixels", "--image_size", "16", "--num_workers", "0", "--data_path", str(folder),
                            "--nb_knn", "5", "1000", "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "note: --nb_knn 1000 capped at the 12 training images: k = 12" in out
    assert " 12-NN: top-1" in out and "1000-NN" not in out  # once "1000-NN" with k = 12
    assert set(json.loads((tmp_path / "knn_raw_pixels.json").read_text())["knn"]) == {"5", "12"}


def test_a_non_finite_loss_before_any_checkpoint_names_none(folder, tmp_path, capsys, monkeypatch):
    forward = losses.DINOLoss.forward

    def exploding(self, *a, **k):
        loss, diagnostics = forward(self, *a, **k)
        return loss * float("nan"), diagnostics
    monkeypatch.setattr(losses.DINOLoss, "forward", exploding)
    code, err = cli(TINY + ["--data_path", str(folder), "--output_dir", str(tmp_path / "fresh")], capsys)
    assert code == 1 and "Nothing was written: the run had not saved a checkpoint yet." in err
    assert "last good checkpoint" not in err and not (tmp_path / "fresh" / "checkpoint.pth").exists()
