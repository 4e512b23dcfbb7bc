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
