"""Data-parallel DINO on 2 CPU processes (gloo), launched by torchrun as users do."""
import subprocess
import sys

import torch

from conftest import ROOT, load
from test_train import TINY

train = load("train")


def torchrun(args, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + args
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_two_processes_agree_and_equal_one_process_on_the_whole_batch(folder, tmp_path):
    # 12 images: 2 ranks x batch 2 and 1 process x batch 4 both make 3 steps per epoch over the same images
    # SGD at a high lr from the first step: the weights move far more than the tolerance below, and the update is
    # linear in the gradient (Adam would turn the rounding noise of zero gradients, e.g. of the key bias, into steps)
    argv = [a for a in TINY] + ["--data_path", str(folder), "--drop_path_rate", "0", "--resume", "none",
                                "--optimizer", "sgd", "--lr", "20", "--warmup_epochs", "0"]
    per_rank = argv + ["--batch_size_per_gpu", "2", "--output_dir", str(tmp_path / "ddp")]
    r = torchrun(["tests/distributed_worker.py", str(tmp_path / "ddp.pth"), "3"] + per_rank)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pth", weights_only=True)

    dino, run = train.setup(train.parse_args(argv + ["--batch_size_per_gpu", "4", "--output_dir", str(tmp_path / "one")]))
    initial = {k: v.clone() for k, v in dino.student.state_dict().items()}
    batches = iter(run.loader)
    for it in range(3):
        crops, _ = next(batches)
        train.train_step(dino, crops, it, 1)
    assert torch.allclose(dino.loss_fn.center, ddp["center"], atol=1e-5)
    moved = [k for k, v in dino.student.state_dict().items() if (v - initial[k]).abs().max() > 1e-2]
    assert len(moved) > len(initial) // 2
    for key, model in (("student", dino.student), ("teacher", dino.teacher)):
        for k, v in model.state_dict().items():
            assert torch.allclose(v, ddp[key][k], rtol=0, atol=1e-6), f"{key}.{k}"


def test_train_py_under_torchrun_logs_on_rank_0_with_knn(folder, tmp_path):
    out = tmp_path / "run"
    r = torchrun(["train.py"] + TINY + ["--data_path", str(folder), "--batch_size_per_gpu", "2", "--epochs", "1",
                                        "--warmup_epochs", "0", "--eval_every", "1", "--output_dir", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("epoch 0: loss") == 1 and "k-NN top-1" in r.stdout and "2 process(es)" in r.stdout
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1
