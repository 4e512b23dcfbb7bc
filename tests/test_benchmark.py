"""train.py --benchmark: the line it prints, and the FLOP count behind its TFLOP/s and MFU."""
import re
import subprocess
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT, load
from test_train import TINY

benchmark = load("benchmark")
vits, heads = load("02_vit"), load("03_head")

LINE = re.compile(r"benchmark: ([\d.]+) img/s, ([\d.]+) ms/step, peak memory (\d+) MiB, ([\d.]+) TFLOP/s model FLOPs")


def test_benchmark_prints_a_plausible_line():
    r = subprocess.run([sys.executable, "train.py"] + TINY + ["--benchmark", "3", "--data_path", "textures"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    m = LINE.fullmatch(last)
    assert m, last
    img_s, ms, mem, tflops = map(float, m.groups())
    assert img_s > 0 and abs(img_s - 4 * 1000 / ms) / img_s < 0.02  # batch 4: img/s and ms/step agree
    assert 100 < mem < 24 * 1024 and 0 <= tflops < 10  # a CPU: well under 10 TFLOP/s (tiny model: ~0.00)
    assert "MFU" not in last  # no known peak on a CPU


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
