"""train.py --benchmark: the line it prints, and the FLOP count behind its TFLOP/s and MFU."""
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT, load

benchmark, train, makers = load("benchmark"), load("train"), load("makers")
vits, heads = load("02_vit"), load("03_head")

LINE = re.compile(r"benchmark: ([\d.]+) img/s, ([\d.]+) ms/step, peak memory (\d+) MiB, ([\d.e+-]+) TFLOP/s model FLOPs")


def test_benchmark_prints_a_plausible_line():
    # the course model at batch 16 (TFLOP/s is printed to 3 significant digits, so even a slow CPU shows it)
    argv = ["--arch", "vit_nano", "--patch_size", "8", "--global_size", "32", "--local_size", "16",
            "--local_crops_number", "2", "--out_dim", "256", "--batch_size_per_gpu", "16", "--num_workers", "0",
            "--data_path", "textures"]
    r = subprocess.run([sys.executable, "train.py"] + argv + ["--benchmark", "3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    m = LINE.fullmatch(last)
    assert m, last
    img_s, ms, mem, tflops = map(float, m.groups())
    assert img_s > 0 and abs(img_s - 16 * 1000 / ms) / img_s < 0.02  # batch 16: img/s and ms/step agree
    student, _ = train.build_models(train.parse_args(argv))
    expected = benchmark.step_flops(student, 16, 32, 16, 2) / (ms / 1000) / 1e12  # the FLOPs the step must do
    assert 0 < tflops and abs(tflops - expected) <= 0.006 * expected  # printed with 3 significant digits
    assert 100 < mem < 24 * 1024
    assert "MFU" not in last  # no known peak on a CPU
    share = re.search(r"photometric augmentation \(batched, on cpu\): ([\d.]+) ms/step, ([\d.]+)% of the step", r.stdout)
    assert share and abs(float(share[2]) - 100 * float(share[1]) / ms) < 0.2, r.stdout


def test_more_steps_than_the_run_has(folder, capsys):
    from test_train import TINY  # 2 epochs of 3 iterations: the 3 warm-up and 5 timed steps reuse the schedule
    assert train.main(train.parse_args(TINY + ["--data_path", str(folder), "--benchmark", "5"])) == 0
    assert LINE.fullmatch(capsys.readouterr().out.strip().splitlines()[-1])  # once: IndexError


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The ImageNet-like JPEG folder, built by the command line the README gives."""
    out = tmp_path_factory.mktemp("photos")
    r = subprocess.run([sys.executable, "data.py", "--make", "jpegs", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return out


def test_photos_folder_is_imagenet_like_and_deterministic(photos, tmp_path):
    files = sorted(photos.rglob("*.jpg"))
    assert len(files) == 400 and {p.parent.parent.name for p in files} == {"train", "val"}
    assert len({p.parent.name for p in files}) == 10
    sizes = {Image.open(p).size for p in files}
    assert sizes == {(500, 375), (375, 500)}
    assert "jpegs" in makers.MAKERS
    makers.MAKERS["jpegs"](tmp_path)  # the same bytes again
    assert all((tmp_path / p.relative_to(photos)).read_bytes() == p.read_bytes() for p in files[::37])


PIPELINE = re.compile(r"input pipeline: ([\d.]+) ms of CPU per image, (\d+) img/s per worker core")


@pytest.mark.parametrize("mode", [[], ["--reference_mode"]])  # split recipe (default), and all of it in PIL
def test_benchmark_data_measures_the_workers_cpu_per_image(photos, mode):
    argv = ["--arch", "vit_nano", "--patch_size", "8", "--global_size", "32", "--local_size", "16",
            "--local_crops_number", "2", "--out_dim", "64", "--batch_size_per_gpu", "8", "--num_workers", "1",
            "--data_path", str(photos)]
    r = subprocess.run([sys.executable, "train.py"] + argv + mode + ["--benchmark_data", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    m = PIPELINE.search(r.stdout)
    assert m, r.stdout
    ms, img_s = float(m[1]), int(m[2])
    # both printed rounded: img/s to 0.5, ms to 0.005, which moves 1000 / ms by up to 5 / ms^2
    assert 0.1 < ms < 1000 and abs(img_s - 1000 / ms) <= 0.5 + 5 / ms ** 2
    if not mode:  # on a CPU-only run the workers also did the colour half: both parts are shown
        per_image, batched = map(float, re.search(r"flips ([\d.]+) ms; .*: ([\d.]+) ms\)", r.stdout).groups())
        assert per_image > 0 and batched > 0 and abs(per_image + batched - ms) < 0.02


def test_analytic_flops_match_torch_flop_counter():
    torch.manual_seed(0)
    backbone = vits.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, qkv_bias=True)
    head = heads.DINOHead(48, 64, hidden_dim=32, bottleneck_dim=16)
    model = heads.MultiCropWrapper(backbone, head)
    for blk in backbone.blocks:  # the explicit attention path: its two matmuls are visible to the counter
        blk.attn.fused = False
    for size in (32, 16):
        x = torch.randn(3, 3, size, size)
        with FlopCounterMode(display=False) as counter:
            model(x)
        expected = benchmark.vit_forward_flops(backbone, head, 3, size)
        # the counter counts matmuls, attention and the patch projection; elementwise ops are not model FLOPs
        assert abs(counter.get_total_flops() - expected) / expected < 0.01, (size, counter.get_total_flops(), expected)


def test_step_flops_match_a_counted_training_step(folder, tmp_path):
    """The step's count (3 x the student's forward, for forward and backward, + the teacher's) against a real step."""
    from test_train import TINY  # vit_nano/8, 16 + 8 px crops, batch 4
    dino, run = train.setup(train.parse_args(TINY + ["--data_path", str(folder), "--output_dir", str(tmp_path)]))
    for m in list(dino.student.modules()) + list(dino.teacher.modules()):
        if isinstance(m, vits.Attention):
            m.fused = False  # the explicit attention: its two matmuls are visible to the counter
    crops = [torch.randn(4, 3, 16, 16)] * 2 + [torch.randn(4, 3, 8, 8)] * 2
    with FlopCounterMode(display=False) as counter:
        train.train_step(dino, crops, run.niter, 1)
    expected = benchmark.step_flops(dino.student, 4, 16, 8, 2)
    assert abs(counter.get_total_flops() - expected) / expected < 0.01, (counter.get_total_flops(), expected)  # 0.2 %
