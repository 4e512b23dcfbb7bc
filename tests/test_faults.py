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

from conftest import ROOT, load
from test_train import TINY

train = load("train")
ckpt = load("checkpoint")
losses = load("04_loss")


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


@pytest.mark.parametrize("extra,expected", [
    (["--arch", "vit_huge"], "unknown --arch vit_huge"),
    (["--patch_size", "5"], "does not divide --global_size 16"),
    (["--local_crops_number", "-1"], "--local_crops_number must be >= 0"),
    (["--batch_size_per_gpu", "64"], "fewer than one batch of 64"),
    (["--data_path", "/nonexistent/images"], "neither a directory nor a built-in dataset"),
    (["--out_dim", "64"], "shape mismatch"),  # resuming a K = 32 checkpoint with K = 64
    (["--arch", "vit_tiny"], "does not match the model"),  # resuming a vit_nano checkpoint as vit_tiny
])
def test_bad_arguments_fail_clearly_and_keep_files(extra, expected, folder, trained, capsys):
    before = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    if extra[0] == "--arch" and extra[1] == "vit_tiny":
        extra = extra + ["--patch_size", "8"]
    code, err = cli(TINY + ["--data_path", str(folder), "--output_dir", str(trained)] + extra, capsys)
    assert code == 2 and expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()} == before


def test_empty_and_imageless_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noimg" / "class_a").mkdir(parents=True)
    (tmp_path / "noimg" / "class_a" / "notes.txt").write_text("not an image")
    for d in ("empty", "noimg"):
        code, err = cli(TINY + ["--data_path", str(tmp_path / d), "--output_dir", str(tmp_path / "o")], capsys)
        assert code == 2 and "no images in" in err and "Traceback" not in err
        assert not (tmp_path / "o").exists()  # bad input creates nothing, not even the output directory


def test_bad_resume_files(tmp_path, folder, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(1000))
    pickled = tmp_path / "pickled.pth"
    torch.save({"student": {}, "args": Namespace(arch="vit_small"), "hook": print}, pickled)  # a function: code
    weights = tmp_path / "backbone.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 8)}, weights)
    for path, expected in ((junk, "is not a"), (pickled, "weights_only=True) refuses"),
                           (weights, "is not a train.py checkpoint"), (tmp_path / "missing.pth", "does not exist")):
        code, err = cli(TINY + ["--data_path", str(folder), "--output_dir", str(tmp_path / "o"),
                                "--resume", str(path)], capsys)
        assert code == 2 and expected in err and "Traceback" not in err, err


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


def test_sigterm_checkpoints_and_resume_continues(folder, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "train.py"] + TINY + ["--data_path", str(folder), "--output_dir", str(out),
                            "--epochs", "1000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "log.txt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "SIGTERM" in err and "the same command resumes" in err, err
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["epoch"] * 3 + state["step"] >= 3  # at least the first epoch is in it
    # the same command (here: one more epoch) continues from the saved iteration and finishes
    r = subprocess.run([sys.executable, "train.py"] + TINY + ["--data_path", str(folder), "--output_dir", str(out),
                       "--epochs", str(state["epoch"] + 1)], cwd=ROOT, capture_output=True, text=True, timeout=240)
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
