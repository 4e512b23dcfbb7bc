"""train.py end to end on tiny settings: the loop's rules, checkpoints, resume, bad input."""
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import load

train = load("train")
monitor = load("monitor")

TINY = ["--arch", "vit_nano", "--patch_size", "8", "--global_size", "16", "--local_size", "8",
        "--local_crops_number", "2", "--out_dim", "32", "--batch_size_per_gpu", "4", "--epochs", "2",
        "--warmup_epochs", "1", "--num_workers", "0", "--drop_path_rate", "0.1", "--log_freq", "2",
        "--precision", "fp32"]  # the comparisons below are exact; bf16 (auto on AMX CPUs) is the course preset's


def run(argv):
    return train.main(train.parse_args(argv))


def test_schedules_and_param_groups_follow_official_rules():
    args = train.parse_args(TINY + ["--data_path", "textures"])
    student, teacher = train.build_models(args)
    groups = train.params_groups(student)
    named = dict(student.named_parameters())
    decay = {n for n, p in named.items() if any(p is q for q in groups[0]["params"])}
    no_decay = {n for n, p in named.items() if any(p is q for q in groups[1]["params"])}
    assert groups[1]["weight_decay"] == 0.0
    # the official rule, exactly: biases and 1-D parameters free, every other trainable parameter decayed
    assert no_decay == {n for n, p in named.items() if p.requires_grad and (n.endswith(".bias") or p.ndim == 1)}
    assert decay == {n for n, p in named.items() if p.requires_grad} - no_decay and decay and no_decay
    assert {"backbone.cls_token", "backbone.pos_embed", "backbone.blocks.0.attn.qkv.weight"}.isdisjoint(no_decay)
    assert "head.last_layer.weight_g" not in no_decay and not named["head.last_layer.weight_g"].requires_grad
    # the teacher: same weights, no stochastic depth, no gradients
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values()))
    assert student.backbone.blocks[-1].drop_path.drop_prob > 0 and teacher.backbone.blocks[-1].drop_path.drop_prob == 0


def test_per_parameter_clipping_and_frozen_last_layer():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model[0].weight.grad = torch.full((3, 3), 10.0)  # norm 30 -> clipped to 3
    model[0].bias.grad = torch.tensor([0.1, 0.0, 0.0])  # norm 0.1 -> untouched
    model[1].weight.grad = torch.ones(1, 3) * 1.5  # norm 2.6 -> untouched
    model[1].bias.grad = None
    train.clip_gradients(model, 3.0)
    assert model[0].weight.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    assert torch.equal(model[0].bias.grad, torch.tensor([0.1, 0.0, 0.0]))
    assert model[1].weight.grad.norm().item() == pytest.approx(1.5 * math.sqrt(3), rel=1e-6)
    head = load("03_head").DINOHead(4, 8, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    head(torch.randn(2, 4)).sum().backward()
    train.cancel_gradients_last_layer(0, head, freeze_last_layer=1)
    assert head.last_layer.weight_v.grad is None and head.mlp[0].weight.grad is not None
    head(torch.randn(2, 4)).sum().backward()
    train.cancel_gradients_last_layer(1, head, freeze_last_layer=1)
    assert head.last_layer.weight_v.grad is not None


def test_one_step_moves_teacher_by_exactly_the_ema_rule(folder, tmp_path):
    args = train.parse_args(TINY + ["--data_path", str(folder), "--output_dir", str(tmp_path), "--resume", "none",
                                    "--lr", "0.5"])  # large, so that the student's move is far above rounding
    dino, run = train.setup(args)
    crops, _ = next(iter(run.loader))
    assert [tuple(c.shape) for c in crops] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2
    sched, niter = dino.schedule, run.niter
    # the official schedules: lr warmed up from 0 over one epoch to lr x batch / 256, wd and momentum from their start
    assert sched.lr[0] == 0.0 and sched.lr[niter] == pytest.approx(0.5 * 4 / 256)
    assert sched.wd[0] == pytest.approx(0.04) and sched.momentum[0] == pytest.approx(0.996)
    student_before = [p.clone() for p in dino.student.parameters()]
    teacher_before = [p.clone() for p in dino.teacher.parameters()]
    loss, diag = train.train_step(dino, crops, niter, 1)  # the first step after the warm-up
    assert dino.optimizer.param_groups[0]["lr"] == sched.lr[niter]
    m = sched.momentum[niter]
    moved = 0
    for s0, t0, t, s in zip(student_before, teacher_before, dino.teacher.parameters(), dino.student.parameters()):
        assert torch.allclose(t, m * t0 + (1 - m) * s.detach(), rtol=0, atol=1e-6)
        moved += (s - s0).abs().max() > 1e-3 and (t - t0).abs().max() > 1e-6
    assert moved > len(student_before) // 2  # student and teacher really moved (grad-free parameters do not)
    assert math.isfinite(loss.item())


def stop_after(monkeypatch, k):
    """Make the k-th step look like the one during which Ctrl-C arrived."""
    calls = {"n": 0}

    def agreed(self, log_point, device):
        calls["n"] += 1
        self.requested = self.requested or calls["n"] == k
        return self.requested

    monkeypatch.setattr(train.runtime.Stop, "agreed", agreed)


@pytest.mark.parametrize("stop_step", [4, 3])  # mid-epoch, and at the end of the first epoch
def test_end_to_end_checkpoint_log_and_resume_is_bit_identical(folder, tmp_path, capsys, monkeypatch, stop_step):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(TINY + ["--data_path", str(folder), "--output_dir", str(a), "--saveckp_freq", "2"]) == 0
    with monkeypatch.context() as mp:
        stop_after(mp, stop_step)
        assert run(TINY + ["--data_path", str(folder), "--output_dir", str(b)]) == 0
    interrupted = torch.load(b / "checkpoint.pth", weights_only=True)
    assert (interrupted["epoch"], interrupted["step"]) == divmod(stop_step, 3)
    assert run(TINY + ["--data_path", str(folder), "--output_dir", str(b)]) == 0
    assert "resumed from" in capsys.readouterr().out
    sa = torch.load(a / "checkpoint.pth", weights_only=True)
    sb = torch.load(b / "checkpoint.pth", weights_only=True)
    for key in ("student", "teacher", "dino_loss"):
        for k in sa[key]:
            assert torch.equal(sa[key][k], sb[key][k]), f"{key}.{k} differs after resume"
    assert sa["epoch"] == 2 and isinstance(sa["args"], dict)
    # the official rule: checkpoint{epoch:04d}.pth when epoch % saveckp_freq == 0, epoch counted from 0
    assert torch.load(a / "checkpoint0000.pth", weights_only=True)["epoch"] == 1
    assert not (a / "checkpoint0001.pth").exists()
    rows = [json.loads(line) for line in (a / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert [r["epoch"] for r in map(json.loads, (b / "log.txt").read_text().splitlines())] == [0, 1]
    for r in rows:
        assert {"loss", "lr", "wd", "momentum", "teacher_temp", "entropy", "kl", "batch_entropy", "img_per_s"} <= set(r)
        assert r["kl"] >= -1e-4 and r["entropy"] >= 0  # H(P_t, P_s) >= H(P_t) >= 0 (Gibbs)
        assert r["batch_entropy"] >= r["entropy"] - 1e-4  # h of a mean is at least the mean h (concavity)
    assert (a / "curves.png").exists() and json.loads((a / "config.json").read_text())["out_dim"] == 32


def test_backbone_and_head_compile_without_graph_breaks_and_match_eager():
    """What train.py compiles on CUDA, compiled here once on CPU (fullgraph: a graph break is an error),
    with train.py's dynamic=False: one graph per crop resolution, none more."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    vits, heads = load("02_vit"), load("03_head")
    backbone = vits.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, qkv_bias=True)
    head = heads.DINOHead(32, 16, hidden_dim=32, bottleneck_dim=8)
    x = torch.randn(4, 3, 16, 24)  # non-square: position embeddings are interpolated inside the graph
    eager = head(backbone(x))
    eager.sum().backward()
    grads = [p.grad.clone() for p in backbone.parameters()]
    backbone.zero_grad()
    counters.clear()
    backbone_c = torch.compile(backbone, fullgraph=True, dynamic=False)
    compiled = torch.compile(head, fullgraph=True, dynamic=False)(backbone_c(x))
    compiled.sum().backward()
    assert torch.allclose(compiled, eager, atol=1e-5)
    assert all(torch.allclose(p.grad, g, atol=1e-5) for p, g in zip(backbone.parameters(), grads))
    for h, w in ((8, 8), (16, 24), (8, 8)):  # a local crop size, then both again: the second resolution compiles once
        backbone_c(torch.randn(4, 3, h, w))
    assert counters["stats"]["unique_graphs"] == 3  # backbone at 2 resolutions + head


def test_collapse_is_named_in_plain_words():
    K = 1024
    assert "uniform" in monitor.collapse_message(math.log(K) * 0.99, 0.001, K)
    assert "one dimension dominates" in monitor.collapse_message(0.05, 0.001, K)
    assert monitor.collapse_message(3.0, 1.5, K) is None  # healthy: KL clearly positive
    assert monitor.collapse_message(math.log(K) * 0.99, 1.0, K) is None  # uniform teacher, but the student disagrees


def rows(pairs, batch_entropy=0.0):
    return [{"entropy": h, "kl": kl, "batch_entropy": batch_entropy} for h, kl in pairs]


def test_drift_towards_a_collapse_is_named_before_it_happens():
    K, log_k = 256, math.log(256)  # 5.55
    healthy = rows([(2.13, 1.98), (1.95, 1.40), (1.78, 1.05), (1.20, 0.90), (0.82, 0.80)])  # the course run
    uniform = rows([(2.5, 2.0), (3.6, 1.5), (4.2, 1.0), (4.55, 0.6)])  # h climbs past 80 % of log K, KL falls
    one_dim = rows([(1.5, 1.2), (0.9, 0.8), (0.5, 0.5), (0.3, 0.3)])  # h falls below 10 % of log K, KL falls
    for n in range(1, len(healthy) + 1):
        assert monitor.drift_message(healthy[:n], K) is None
    assert monitor.drift_message(uniform[:3], K) is None  # 4.2 is 76 % of log K: not yet
    assert "uniform collapse" in monitor.drift_message(uniform, K)
    assert "--teacher_temp" in monitor.drift_message(uniform, K)
    assert "one dimension" in monitor.drift_message(one_dim, K)
    sharp = rows([(1.76, 2.05), (0.42, 1.47), (0.28, 1.22), (0.28, 1.15)])  # real photographs: sharp, still learning
    assert monitor.drift_message(sharp, K) is None
    recovering = uniform + rows([(4.6, 0.7)])  # KL grows again: the student is learning, no warning
    assert monitor.drift_message(recovering, K) is None
    settled = rows([(4.9, 0.50), (4.9, 0.46), (4.9, 0.43)])  # flat at 88 % of log K while KL keeps shrinking
    assert "uniform collapse" in monitor.drift_message(settled, K)
    assert monitor.drift_message(rows([(0.4 * log_k, 2.0), (0.4 * log_k, 1.5), (0.4 * log_k, 1.0)]), K) is None
    late = rows([(0.185, 0.623), (0.180, 0.599), (0.168, 0.577)])  # the 1440-step course run (95 %), KL easing down
    assert monitor.drift_message(late, K) is None
    # surfaces, epochs 7-9 of the preset: sharp and KL falling, but the batch's mean P_t spreads over ~6 dimensions
    # (h 1.76 = 32 % of log K) and the run ends at 89.8 %, above random init: not one dimension
    spread = [(0.14, 0.64), (0.09, 0.60), (0.07, 0.54)]
    assert monitor.drift_message(rows(spread, batch_entropy=1.76), K) is None
    assert "one dimension" in monitor.drift_message(rows(spread, batch_entropy=0.3), K)


def test_a_run_that_learns_nothing_is_named():
    # the shape folders of docs/own-images.md: no collapse, but the k-NN of the network before training unchanged
    assert "hardly better than the same network before training" in monitor.stalled_message(
        {"knn_top1": 19.6, "knn_init": 23.6})
    assert "supervised.py" in monitor.stalled_message({"knn_top1": 26.0, "knn_init": 25.1})
    assert monitor.stalled_message({"knn_top1": 94.8, "knn_init": 44.8}) is None  # the course run
    assert monitor.stalled_message({"knn_top1": 88.9, "knn_init": 85.7}) is None  # surfaces: a fifth fewer errors
    assert monitor.stalled_message({"knn_top1": 50.0, "knn_init": None}) is None  # resumed without it: no guess
    assert monitor.stalled_message({"knn_top1": 50.0}) is None


@pytest.mark.parametrize("batches,epochs,niter", [(78, 6, 78), (22, 22, 22), (13, 37, 13), (781, 6, 80)])
def test_a_step_budget_gives_small_and_large_datasets_the_same_number_of_steps(batches, epochs, niter):
    args = train.parse_args(["--preset", "cpu_course", "--steps", "480"])  # 6 epochs, 1 of warm-up, k-NN every 3
    given = vars(args).copy()
    budget = train.fit_to_budget(args, batches)
    assert budget.niter == niter and budget.epochs == epochs and vars(args) == given  # the flags stay as given
    assert abs(epochs * niter - 480) <= niter / 2 + 1  # about the budget, whatever the dataset's size
    assert budget.warmup_epochs / budget.epochs == pytest.approx(1 / 6, abs=0.03)  # warm-up keeps its share
    evaluated = [e for e in range(epochs) if (e + 1) % budget.eval_every == 0 or e + 1 == epochs]
    assert len(evaluated) == 2 and evaluated[-1] == epochs - 1  # halfway (or just after) and at the end


def test_large_files_are_decoded_once_for_training_and_its_evaluations(tmp_path, capsys):
    import skimage.data
    from PIL import Image
    photo = Image.fromarray(skimage.data.astronaut())  # 512 px: far more than 16 px crops need
    for split, n in (("train", 4), ("val", 2)):
        for c in ("a", "b"):
            (tmp_path / "photos" / split / c).mkdir(parents=True)
            for i in range(n):
                photo.rotate(90 * i + 180 * (c == "b")).save(tmp_path / "photos" / split / c / f"{i}.jpg")
    assert run(TINY + ["--data_path", str(tmp_path / "photos"), "--output_dir", str(tmp_path / "out"),
                       "--eval_every", "1"]) == 0
    err = capsys.readouterr().err
    assert err.count("8 training images are far larger") == 1 and err.count("4 val images are far larger") == 1
    assert "train images" not in err  # the k-NN memory bank is the training set, already in memory
    logged = [json.loads(line) for line in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert all("knn_top1" in r for r in logged) and len({r["knn_init"] for r in logged}) == 1  # measured once


def test_short_epochs_checkpoint_about_once_a_minute_and_a_crash_loses_no_log_row(folder, tmp_path, monkeypatch):
    saves, draws = [], []
    save, plot = train.ckpt.save_atomic, train.monitor.plot_curves
    def counted(state, path):
        if Path(path).name == "checkpoint.pth":  # not the official checkpoint0000.pth, --saveckp_freq
            saves.append(state["epoch"])
        save(state, path)
    monkeypatch.setattr(train.ckpt, "save_atomic", counted)
    monkeypatch.setattr(train.monitor, "plot_curves", lambda rows, path: draws.append(len(rows)) or plot(rows, path))
    monkeypatch.setattr(train.ckpt, "SAVE_EVERY_S", 1e9)  # every epoch ends within the minute
    out, argv = tmp_path / "o", TINY + ["--data_path", str(folder), "--epochs", "4"]
    one_epoch = train.train_one_epoch
    def power_cut(dino, run, epoch, *a):
        if epoch == 2:
            raise SystemExit("power cut")
        return one_epoch(dino, run, epoch, *a)
    with monkeypatch.context() as mp:
        mp.setattr(train, "train_one_epoch", power_cut)
        with pytest.raises(SystemExit):
            run(argv + ["--output_dir", str(out)])
    assert saves == [1] and draws == [1]  # the first epoch, then none within the minute: epoch 1 is only in log.txt
    assert [json.loads(r)["epoch"] for r in (out / "log.txt").read_text().splitlines()] == [0, 1]
    assert run(argv + ["--output_dir", str(out)]) == 0  # resumes after epoch 0: epoch 1 is trained and logged again
    assert saves == [1, 2, 4] and draws == [1, 2, 4]  # a new process's first epoch, and the last epoch always
    assert [json.loads(r)["epoch"] for r in (out / "log.txt").read_text().splitlines()] == [0, 1, 2, 3]
    monkeypatch.setattr(train.ckpt, "SAVE_EVERY_S", 0)
    assert run(argv + ["--output_dir", str(tmp_path / "every")]) == 0
    assert saves[3:] == [1, 2, 3, 4] and draws[3:] == [1, 2, 3, 4]  # epochs of a minute or more: after each
    monkeypatch.setattr(train.ckpt, "SAVE_EVERY_S", 1e9)
    stop_after(monkeypatch, 6)  # Ctrl-C in the last step of the second epoch, within the minute: saved all the same
    assert run(argv + ["--output_dir", str(tmp_path / "stop")]) == 0
    assert saves[7:] == [1, 2] and torch.load(tmp_path / "stop" / "checkpoint.pth", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("device, props, expected", [
    ("cuda", {"capability": (9, 0)}, "bf16"),  # H100
    ("cuda", {"capability": (8, 0)}, "bf16"),  # A100
    ("cuda", {"capability": (7, 5)}, "fp16"),  # T4: no bf16 tensor cores, fp16 with loss scaling
    ("cuda", {"capability": (7, 0)}, "fp16"),  # V100
    ("mps", {}, "fp32"),
    ("cpu", {"cpu_bf16": ["AMX", "AVX-512 BF16"]}, "bf16"),  # Xeon since Sapphire Rapids
    ("cpu", {"cpu_bf16": ["AVX-512 BF16"]}, "bf16"),  # AMD Zen 4 and later, Cooper Lake
    ("cpu", {"cpu_bf16": []}, "fp32"),  # AVX2 only: bf16 would be emulated
])
def test_auto_precision_follows_what_the_device_multiplies_natively(device, props, expected):
    precision, why = train.runtime.auto_precision(torch.device(device), **props)
    assert precision == expected and why
    assert train.autocast_dtype(precision) == {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def test_a_notebook_gets_the_gpu_and_the_precision_train_py_would_choose(monkeypatch, capsys):
    device, precision, _ = train.runtime.notebook_device()
    assert device == train.runtime.pick_device(0) and precision == train.runtime.auto_precision(device)[0]
    monkeypatch.setattr(train.runtime, "pick_device", lambda rank: torch.device("cuda", rank))
    device, precision, why = train.runtime.notebook_device(capability=(7, 5))  # a T4
    assert (device, precision) == (torch.device("cuda", 0), "fp16") and "loss scaling" in why
    assert capsys.readouterr().out.splitlines()[-1] == f"device cuda:0, precision fp16: {why}"


def test_a_cpu_whose_features_are_unknown_is_measured(monkeypatch):
    assert 0 < train.runtime.bf16_speedup(n=64, reps=1) < 100  # a ratio of two timings
    monkeypatch.setattr(train.runtime, "cpu_bf16_units", lambda: None)
    monkeypatch.setattr(train.runtime, "bf16_speedup", lambda: 2.0)
    assert train.runtime.auto_precision(torch.device("cpu"))[0] == "bf16"
    monkeypatch.setattr(train.runtime, "bf16_speedup", lambda: 0.3)  # emulated: three times slower
    assert train.runtime.auto_precision(torch.device("cpu"))[0] == "fp32"


@pytest.mark.parametrize("crops_s, step_s, threads, cores, expected", [
    (0.03, 0.20, 2, 2, 0),  # the course: cheap crops, both cores step
    (0.50, 0.20, 2, 2, 1),  # large JPEGs: a worker keeps the step fed
    (0.03, 0.20, 1, 2, 1),  # OMP_NUM_THREADS=1: the idle core makes the crops
    (2.00, 0.20, 16, 16, 6),  # many cores, dear crops: as many workers as keep the step fed, no more
    (0.50, 0.20, 1, 1, 0),  # one core: nowhere else to make them
])
def test_loader_workers_follow_the_measured_costs(crops_s, step_s, threads, cores, expected):
    assert train.runtime.choose_workers(crops_s, step_s, threads, cores) == expected


def test_auto_workers_measure_a_step_without_training_the_run(folder, tmp_path, capsys):
    args = train.parse_args(TINY + ["--data_path", str(folder), "--num_workers", "auto",
                                    "--output_dir", str(tmp_path)])
    dino, run = train.setup(args)
    before = [p.clone() for p in dino.student.parameters()]
    workers, why = train.loader_workers(args, *train.build_data(args)[:2], run.device, dino)
    assert workers in range(torch.get_num_threads() + 1) and "ms" in why
    assert all(torch.equal(a, p) for a, p in zip(before, dino.student.parameters()))
