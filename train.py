"""DINO training: the numbered concepts composed into the loop of the paper's Algorithm 1 and the
official main_dino.py, on one CPU, one GPU, or many through torchrun.

    python train.py --arch vit_small --patch 8 --data_path DIR    # the paper's recipe on an ImageNet-style folder
    python train.py --preset cpu_course                           # a small ViT on the embedded textures, 2-core CPU
    torchrun --nproc_per_node=8 train.py --data_path /imagenet    # data-parallel

Read top to bottom: one iteration of Algorithm 1 (`train_step`) and the three rules around it
(clipping, the frozen last layer, the schedules); the epoch loop with its checkpoints; how
`setup` builds a run from the arguments; the arguments themselves. Devices, processes and
signals are in runtime.py, the loader in loader.py, log messages and curves in monitor.py.
"""
import argparse
import contextlib
import importlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import benchmark
import checkpoint as ckpt
import cli as cmdline
import data
import images
import monitor
import multicrop_fast
import runtime
from cli import UsageError
from loader import DeviceBatches, training_loader

multicrop = importlib.import_module("01_multicrop")
vits = importlib.import_module("02_vit")
heads = importlib.import_module("03_head")
losses = importlib.import_module("04_loss")
ema = importlib.import_module("05_teacher_ema")
knn = importlib.import_module("06_knn")


# ---------------------------------------------------------------------------- Algorithm 1
@dataclass
class Schedules:
    """One value per iteration (epochs x iterations per epoch), as the official code."""
    lr: np.ndarray  # linear warm-up to lr x total batch / 256, then cosine to min_lr
    wd: np.ndarray  # weight decay, cosine from weight_decay to weight_decay_end
    momentum: np.ndarray  # teacher momentum m, cosine from momentum_teacher to 1


@dataclass
class DINO:
    """Everything one iteration of Algorithm 1 reads or updates."""
    student: nn.Module  # g_theta_s: backbone + head (wrapped in DDP when there are several processes)
    teacher: nn.Module  # g_theta_t: the same network, no gradients, an EMA of the student
    loss_fn: losses.DINOLoss  # H(P_t, P_s) over view pairs; holds the centre c and the tau_t schedule
    optimizer: torch.optim.Optimizer  # AdamW (or SGD), weight decay on weight matrices only
    scaler: torch.amp.GradScaler  # loss scaling for fp16; a pass-through otherwise
    schedule: Schedules
    autocast: contextlib.AbstractContextManager  # bf16/fp16 autocast, or nothing in fp32
    clip_grad: float  # max gradient norm per parameter tensor, 0: off
    freeze_last_layer: int  # epochs during which the prototypes get no gradient


def train_step(dino, crops, it, epoch):
    """One DINO iteration on crops = [g1, g2, l1..lN], each (B, 3, h, w). Returns the loss and the
    diagnostics (teacher entropy, KL) as tensors: no host sync."""
    for i, group in enumerate(dino.optimizer.param_groups):
        group["lr"] = float(dino.schedule.lr[it])  # plain floats: the checkpoint must load with weights_only
        if i == 0:  # only the weight matrices are regularised
            group["weight_decay"] = float(dino.schedule.wd[it])
    with dino.autocast:
        teacher_output = dino.teacher(crops[:2])  # (2B, K): the teacher sees only the global crops
        student_output = dino.student(crops)  # (V B, K): the student sees them all
        loss, diagnostics = dino.loss_fn(student_output, teacher_output, epoch, return_diagnostics=True)
    dino.optimizer.zero_grad(set_to_none=True)
    dino.scaler.scale(loss).backward()
    dino.scaler.unscale_(dino.optimizer)
    if dino.clip_grad:
        clip_gradients(dino.student, dino.clip_grad)
    cancel_gradients_last_layer(epoch, dino.student, dino.freeze_last_layer)
    dino.scaler.step(dino.optimizer)
    dino.scaler.update()
    # theta_t <- m theta_t + (1 - m) theta_s
    ema.ema_update(dino.teacher, unwrap(dino.student), dino.schedule.momentum[it])
    return loss.detach(), diagnostics


@torch.no_grad()
def clip_gradients(model, clip):
    """Per-parameter clipping, as the official code: each tensor's gradient is scaled to norm <= clip.
    min(1, clip / norm) is applied unconditionally, so there is no host sync on the comparison."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norms = torch.stack(torch._foreach_norm(grads))  # one norm per tensor
    torch._foreach_mul_(grads, (clip / (norms + 1e-6)).clamp_(max=1.0).unbind())


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    """The prototypes stay put during the first epoch(s) while the rest finds its feet."""
    if epoch < freeze_last_layer:
        for name, p in model.named_parameters():
            if "last_layer" in name:
                p.grad = None


def unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------- the run around it
@dataclass
class Run:
    """Where a run's data comes from, where its results go, and where it stands."""
    args: argparse.Namespace
    device: torch.device
    precision: str  # fp32, bf16 or fp16
    compiled: bool  # student and teacher went through torch.compile
    rank: int  # this process, of `world`
    world: int
    loader: DeviceBatches  # batches of finished crops [g1, g2, l1..lN] on the device; its sampler resumes
    niter: int  # iterations per epoch
    workers: int  # data-loading processes
    out: Path  # --output_dir
    shrink: int = None  # the shorter side (px) large images are shrunk to, once (images.ShrunkImages)
    saved_at: float = -math.inf  # time.monotonic() of the last checkpoint written
    start_epoch: int = 0  # where a resumed run continues
    start_step: int = 0
    log_rows: list = None  # log.txt rows of the epochs already done
    resumed_from: Path = None


SAVE_EVERY_S = 60  # epochs of a few seconds (small folders) are checkpointed about once a minute, not each time


def fit(dino, run, stop):
    """Epochs until --epochs, a checkpoint after each (and when stopped mid-epoch), k-NN every --eval_every.
    When epochs take seconds, writing the checkpoint (student, teacher and optimizer state) and redrawing
    curves.png after each would take more time than the steps: then only the first epoch to end SAVE_EVERY_S
    after the last checkpoint writes one, and the last epoch; log.txt has every epoch."""
    args, out, epoch, step = run.args, run.out, run.start_epoch, run.start_step
    while epoch < args.epochs:
        run.loader.sampler.set_epoch(epoch)
        run.loader.sampler.skip = step * args.batch_size_per_gpu  # a run stopped mid-epoch resumes at its next batch
        dino.student.train()
        row = train_one_epoch(dino, run, epoch, step, stop)
        if row is None:  # a non-finite loss: stop before anything is written
            return 1
        step += row["steps"]
        done = step == run.niter
        if done and args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            res = knn.evaluate(dino.teacher.backbone, args.data_path, args.global_size, run.device, (20,),
                               batch_size=256, num_workers=run.workers, dtype=autocast_dtype(run.precision),
                               shrink=run.shrink)
            row["knn_top1"], row["knn_top5"] = res[20]
        if run.rank == 0:
            due = not done or stop.requested or epoch + 1 == args.epochs \
                or time.monotonic() - run.saved_at >= SAVE_EVERY_S
            named = done and args.saveckp_freq and epoch % args.saveckp_freq == 0  # named as the official ones
            state = checkpoint_state(dino, args, epoch + 1 if done else epoch, 0 if done else step) \
                if due or named else None
            if due:
                ckpt.save_atomic(state, out / "checkpoint.pth")
                run.saved_at = time.monotonic()
            if named:
                ckpt.save_atomic(state, out / f"checkpoint{epoch:04d}.pth")  # 0000: after the first epoch
            if done:
                log_epoch(row, epoch, run, dino.loss_fn, draw=due)
        if not done or stop.requested:  # stopped by a signal
            if run.rank == 0:
                print(f"stopped at iteration {step}/{run.niter} of epoch {epoch}; saved {out / 'checkpoint.pth'}; "
                      f"the same command resumes", file=sys.stderr)
            return 0
        epoch, step = epoch + 1, 0
    return 0


def train_one_epoch(dino, run, epoch, start_step, stop):
    """Iterations start_step.. of one epoch; returns the epoch's means, or None on a non-finite loss."""
    from tqdm import tqdm
    args, device, niter = run.args, run.device, run.niter
    keys = ("loss", "entropy", "kl", "batch_entropy")
    sums = {k: torch.zeros((), device=device) for k in keys}
    never = torch.iinfo(torch.int64).max
    first_bad = torch.full((), never, device=device)  # the first iteration with a non-finite loss, if any
    n, t0 = 0, time.perf_counter()
    bar = tqdm(total=niter, initial=start_step, desc=f"epoch {epoch}", disable=run.rank != 0, leave=False,
               dynamic_ncols=True)
    for i, (crops, _) in zip(range(start_step, niter), run.loader):  # an epoch may stop before the data ends
        it = epoch * niter + i
        # stochastic depth draws seeded by the iteration: a resumed run makes the same ones
        torch.manual_seed(hash((args.seed, run.rank, it)) % 2 ** 62)
        loss, diagnostics = train_step(dino, crops, it, epoch)
        # remember the first non-finite step without a host sync; it is checked at each log point
        first_bad = torch.where(torch.isfinite(loss), first_bad, first_bad.clamp(max=it))
        for k, v in dict(diagnostics, loss=loss).items():
            sums[k] += v
        n += 1
        log_point = (i + 1) % args.log_freq == 0 or i + 1 == niter
        if log_point:
            if dist.is_initialized():  # every process stops at the same log point
                dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
            if first_bad.item() != never:
                break
            dt = time.perf_counter() - t0
            bar.set_postfix(loss=f"{sums['loss'].item() / n:.4f}", lr=f"{dino.schedule.lr[it]:.2e}",
                            img_s=f"{n * args.batch_size_per_gpu * run.world / dt:.0f}")
            bar.update((i + 1) - bar.n)
        if stop.agreed(log_point, device):
            break
    bar.close()
    if first_bad.item() != never:  # checked here too: a Ctrl-C between log points must not save a broken model
        print(f"\nerror: the loss is not finite at iteration {int(first_bad.item())} (epoch {epoch}). Likely "
              f"causes: fp16 with small patches (use --precision bf16 or fp32), a too high --lr, or "
              f"--teacher_temp above 0.07. The last good checkpoint is {run.out / 'checkpoint.pth'} "
              f"(nothing was written after the failure).", file=sys.stderr)
        return None
    dt = time.perf_counter() - t0
    it = epoch * niter + i
    means = torch.stack([sums[k] for k in keys]) / n
    if dist.is_initialized():  # the epoch's numbers over all processes
        dist.all_reduce(means)
        means /= dist.get_world_size()
    row = dict(zip(keys, means.tolist()))
    row.update(lr=float(dino.schedule.lr[it]), wd=float(dino.schedule.wd[it]),
               momentum=float(dino.schedule.momentum[it]), steps=n,
               img_per_s=n * args.batch_size_per_gpu * run.world / dt)
    return row


def log_epoch(row, epoch, run, loss_fn, draw=True):
    """A line of log.txt, curves.png redrawn (if `draw`), a line on the console, and plain words if it collapses."""
    row.update(epoch=epoch, out_dim=run.args.out_dim, teacher_temp=loss_fn.teacher_temp(epoch))
    run.log_rows.append(row)
    with open(run.out / "log.txt", "a") as f:
        f.write(json.dumps(row) + "\n")
    if draw:
        monitor.plot_curves(run.log_rows, run.out / "curves.png")
    knn_str = f", k-NN top-1 {row['knn_top1']:.1f}%" if "knn_top1" in row else ""
    print(f"epoch {epoch}: loss {row['loss']:.4f}, h(P_t) {row['entropy']:.3f}, KL {row['kl']:.3f}, "
          f"h(batch mean) {row['batch_entropy']:.2f}"
          f"{knn_str}, {row['img_per_s']:.0f} img/s")
    K = run.args.out_dim
    msg = monitor.collapse_message(row["entropy"], row["kl"], K)
    if not msg and not monitor.drift_message(run.log_rows[:-1], K):  # a drift is named once, when it starts
        msg = monitor.drift_message(run.log_rows, K)
    if msg:
        print(msg, file=sys.stderr)


def checkpoint_state(dino, args, epoch, step):
    """Plain types only, so that torch.load(weights_only=True) reads it; keys as the official checkpoint."""
    return {"student": unwrap(dino.student).state_dict(), "teacher": dino.teacher.state_dict(),
            "optimizer": dino.optimizer.state_dict(), "dino_loss": dino.loss_fn.state_dict(),
            "epoch": epoch, "step": step, "args": vars(args), "scaler": dino.scaler.state_dict()}


# what a checkpoint's network and optimizer state are made for: a resumed run must have the same
RESUME_FLAGS = ("arch", "patch_size", "global_size", "out_dim", "use_bn_in_head", "norm_last_layer", "optimizer")


def read_checkpoint(path, args, same_data=False):
    """A checkpoint_state from `path`, checked against this run's flags before anything is written: the same
    RESUME_FLAGS, and when it stopped mid-epoch the same batch size (its step counts batches of that size).
    With `same_data` (found in --output_dir, not named by --resume) also the same --data_path: a course run on
    another folder with the same preset must not quietly continue the last one."""
    state = ckpt.load_file(path)
    if not isinstance(state, dict) or not {"student", "teacher", "optimizer", "dino_loss", "epoch"} <= set(state) \
            or not all(isinstance(state.get(k, 0), int) and state.get(k, 0) >= 0 for k in ("epoch", "step")):
        raise ckpt.CheckpointError(f"{path} is not a train.py checkpoint (needs student, teacher, optimizer, "
                                   f"dino_loss, epoch); 06_knn.py and 07_attention.py take backbone files")
    saved = state.get("args")
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved if isinstance(saved, dict) else {}
    for name in RESUME_FLAGS + (("batch_size_per_gpu",) if state.get("step") else ()):
        if name in saved and saved[name] != getattr(args, name):
            why = " and stopped mid-epoch" if name == "batch_size_per_gpu" else ""
            raise UsageError(f"{path} was trained with --{name} {saved[name]}{why}, this run has "
                             f"{getattr(args, name)}; resume with the same flags, or start afresh with --resume none "
                             f"or a new --output_dir")
    where = lambda d: os.path.realpath(d) if os.path.isdir(d) else d  # a folder, or a built-in dataset's name
    other = "data_path" in saved and where(saved["data_path"]) != where(args.data_path)
    if same_data and other and (os.path.isdir(args.data_path) or args.data_path in data.BUILTIN):  # else: named later
        raise UsageError(f"{path} was trained on --data_path {saved['data_path']}, this run reads {args.data_path}; "
                         f"give this run its own --output_dir (or, to continue that run on this data, --resume {path})")
    return state


def load_checkpoint(state, path, dino):
    """Restore a checkpoint_state into `dino`; returns its (epoch, step). Any key mismatch is an error."""
    ckpt.load_strict(dino.student, state["student"], f"{path} (student)")
    ckpt.load_strict(dino.teacher, state["teacher"], f"{path} (teacher)")
    ckpt.load_strict(dino.loss_fn, state["dino_loss"], f"{path} (dino_loss)")
    dino.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        dino.scaler.load_state_dict(state["scaler"])
    return state["epoch"], state.get("step", 0)


# ---------------------------------------------------------------------------- building a run
def build_models(args):
    """Student and teacher: the same backbone + head; stochastic depth in the student only."""
    def build(drop_path_rate):
        backbone = vits.ARCHS[args.arch](patch_size=args.patch_size, img_size=args.global_size,
                                         drop_path_rate=drop_path_rate)
        head = heads.DINOHead(backbone.embed_dim, args.out_dim, use_bn=args.use_bn_in_head,
                              norm_last_layer=args.norm_last_layer)
        return heads.MultiCropWrapper(backbone, head)
    student = build(args.drop_path_rate)
    teacher = ema.build_teacher(student, build(0.0))
    return student, teacher


def params_groups(model):
    """Weight decay except on biases and 1-D parameters (the norms' scales), the official rule; the 3-D CLS
    token and position embedding are decayed, as in the official code."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def fit_to_budget(args, batches):
    """With --steps N, about N iterations whatever the dataset's size: more epochs than --epochs on a small
    dataset, epochs cut to N / --epochs batches of a fresh shuffle on a large one. Warm-up and evaluation
    keep their share of the run. Returns the iterations per epoch."""
    if not args.steps:
        return batches
    epochs = max(args.epochs, round(args.steps / batches))
    scale = epochs / args.epochs
    args.warmup_epochs = round(args.warmup_epochs * scale)
    args.warmup_teacher_temp_epochs = round(args.warmup_teacher_temp_epochs * scale)
    args.freeze_last_layer = round(args.freeze_last_layer * scale)
    # rounded up: every 3 of 6 epochs is every 21 of 41 (k-NN at epochs 20 and 40), not 20 (19, 39 and 40)
    args.eval_every = -(-args.eval_every * epochs // args.epochs)
    args.epochs = epochs
    return min(batches, round(args.steps / epochs))


def autocast_dtype(precision):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def setup(args):
    """The DINO state and the Run around it, from the arguments; a resumed run continues where it stopped.
    Used by main() and, piece by piece, by the tests and notebooks."""
    rank, world, local_rank = runtime.init_distributed()
    device = runtime.pick_device(local_rank)
    cuda = device.type == "cuda"
    if args.reference_mode:
        args.precision, args.compile = ("fp16" if cuda else "fp32"), False
    precision = args.precision if args.precision != "auto" else runtime.auto_precision(device)
    use_compile = cuda if args.compile is None else args.compile
    resume = check_args(args)  # (path, state) of the checkpoint to continue from, or None
    runtime.seed_everything(args.seed)  # the same initial weights on every rank: the teacher is copied before DDP
    out = Path(args.output_dir)
    benchmarking = args.benchmark or args.benchmark_data

    # data: one sample = the 2 + N crops of one image. By default the recipe is split: decode, crops and flips
    # per image in the workers (uint8), the colour operations batched where the model runs (in the workers on
    # a CPU-only run); --reference_mode runs the whole recipe per image in PIL, as the official code.
    crop_args = (tuple(args.global_crops_scale), tuple(args.local_crops_scale), args.local_crops_number,
                 args.global_size, args.local_size)
    if args.reference_mode:
        transform, augment, loader = multicrop.DataAugmentationDINO(*crop_args), None, None
    else:
        transform = multicrop_fast.DataAugmentationDINOSplit(*crop_args)
        augment, loader = transform.photometric, images.path_if_jpeg
    # files far larger than these crops need (phone photos for 32 px crops) are decoded once, shrunk, and kept
    # in memory (not in --reference_mode): every crop and the evaluation's resize still come from twice their pixels
    shrink = None if args.reference_mode else images.shrink_side(
        [(args.global_size, args.global_crops_scale[0]), (knn.eval_resize(args.global_size), None)] +
        [(args.local_size, args.local_crops_scale[0])] * bool(args.local_crops_number))
    dataset = data.build_dataset(args.data_path, "pretrain", transform, loader=loader, shrink=shrink)
    total_batch = args.batch_size_per_gpu * world
    if len(dataset) < total_batch:
        raise UsageError(f"the dataset has {len(dataset)} images, fewer than one batch of {total_batch} "
                         f"(batches are full, drop_last); lower --batch_size_per_gpu")
    workers = min(args.num_workers, os.cpu_count() or 1)
    if device.type == "cpu":  # the augmentation workers need cores too
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - workers)))
    loader = training_loader(dataset, args.batch_size_per_gpu, workers, args.seed, rank, world, device, augment)
    niter = fit_to_budget(args, len(loader))
    if args.eval_every and not data.has_val(args.data_path):
        print(f"note: {args.data_path} has no val/ folder, so there is no k-NN evaluation during training",
              file=sys.stderr)
        args.eval_every = 0
    elif args.eval_every and args.data_path not in data.BUILTIN:  # a val class train lacks: now, not epochs later
        knn.match_classes(dataset, data.build_dataset(args.data_path, "val"))  # dataset is train/ here

    # models, loss, optimizer, schedules
    student, teacher = build_models(args)
    if world > 1 and cuda and args.use_bn_in_head:  # BatchNorm statistics over the global batch, as official
        student, teacher = map(nn.SyncBatchNorm.convert_sync_batchnorm, (student, teacher))
    student, teacher = student.to(device), teacher.to(device)
    for m in list(student.modules()) + list(teacher.modules()):
        if args.reference_mode and isinstance(m, (vits.Attention, vits.PatchEmbed)):
            m.fused = False  # the official computations
        if device.type == "cpu" and precision != "fp32" and isinstance(m, vits.Attention):
            m.fused = False  # PyTorch's CPU flash-attention backward is slower in bf16 than the explicit softmax
    loss_fn = losses.DINOLoss(args.out_dim, 2 + args.local_crops_number, args.warmup_teacher_temp,
                              args.teacher_temp, args.warmup_teacher_temp_epochs, args.epochs).to(device)
    opt_kw = {"fused": True} if device.type in ("cuda", "cpu") else {}  # one kernel for all parameters
    optimizer = (torch.optim.AdamW(params_groups(student), **opt_kw) if args.optimizer == "adamw" else
                 torch.optim.SGD(params_groups(student), lr=0, momentum=0.9))
    schedule = Schedules(
        lr=ema.cosine_scheduler(args.lr * total_batch / 256, args.min_lr, args.epochs, niter, args.warmup_epochs),
        wd=ema.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter),
        momentum=ema.cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, niter))
    dtype = autocast_dtype(precision)
    dino = DINO(student, teacher, loss_fn, optimizer, torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                schedule, torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext(),
                args.clip_grad, args.freeze_last_layer)
    run = Run(args, device, precision, use_compile, rank, world, loader, niter, workers, out, shrink, log_rows=[])

    if resume:
        path, state = resume
        run.start_epoch, run.start_step = load_checkpoint(state, path, dino)
        if run.start_step >= niter:  # stopped mid-epoch, with epochs of another length (--steps or the data)
            raise UsageError(f"{path} stopped at iteration {run.start_step} of an epoch, and this run's epochs have "
                             f"{niter}; resume with the flags it was made with, or start afresh with --resume none "
                             f"or a new --output_dir")
        log_file = out / "log.txt"
        rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()] \
            if log_file.exists() else []
        run.log_rows = [r for r in rows if r["epoch"] < run.start_epoch]
        if len(run.log_rows) < len(rows) and rank == 0:  # epochs logged after the checkpoint are trained again
            tmp = log_file.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in run.log_rows))
            os.replace(tmp, log_file)
        run.resumed_from = path if run.start_epoch or run.start_step else None
    if use_compile:  # in place: state-dict keys stay the same; one graph per crop resolution
        for m in (student.backbone, student.head, teacher.backbone, teacher.head):
            m.compile(dynamic=False)
    if world > 1:
        dino.student = nn.parallel.DistributedDataParallel(student, device_ids=[local_rank] if cuda else None)
    if rank == 0 and not benchmarking:  # last: bad input, found above, creates nothing
        runtime.check_writable(out)
    return dino, run


# ---------------------------------------------------------------------------- arguments
# A small recipe for a 2-core CPU; explicit flags still override it. The measurements behind each choice are in
# docs/from-code.md.
PRESETS = {
    "cpu_course": {
        "data_path": "textures",
        "arch": "vit_nano", "patch_size": 8,  # 32 px crops of 4 x 4 patches: a cheap step
        "global_size": 32, "local_size": 16,
        "local_crops_number": 2,  # two local crops, not eight: a cheaper step
        "global_crops_scale": (0.4, 1.0),
        "local_crops_scale": (0.1, 0.4),  # at least 10 %: 5 % of 32 x 32 px is a 7 px patch
        "out_dim": 256,  # K: a few thousand images need few prototypes (about 20 images each, as 65536 on ImageNet)
        "use_bn_in_head": True,  # an official option, off for ViTs: a fresh ViT's CLS features point alike
        "batch_size_per_gpu": 64,  # more steps in the time
        "epochs": 6,
        "steps": 1440,  # a budget of steps, not epochs: a small folder gets as many updates as a large one
        "warmup_epochs": 1,  # the first sixth of the run: no room for a 10-epoch warm-up
        "lr": 2e-3, "min_lr": 1e-5,
        "momentum_teacher": 0.99,  # a short run: the teacher must follow the student sooner
        "warmup_teacher_temp": 0.02, "teacher_temp": 0.02,  # a sharper teacher: at 0.04 it drifted to uniform
        "warmup_teacher_temp_epochs": 0,
        "freeze_last_layer": 0,  # no room for frozen prototypes in a short run
        "drop_path_rate": 0.0,  # no stochastic depth in a 6-block ViT
        "num_workers": 1,
        "eval_every": 3,  # halfway and at the end
        "saveckp_freq": 0,
        "output_dir": "runs/cpu_course",
    },
}


def get_args_parser():
    p = cmdline.Parser("DINO", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named set of defaults (explicit flags still win)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="vit_small", choices=list(vits.ARCHS))
    g.add_argument("--patch_size", "--patch", type=cmdline.patch_size, default=16,
                   help="smaller patches: better features, quadratically more tokens; "
                        "with patches < 16 the authors train in fp32 (fp16 overflows), bf16 is fine")
    g.add_argument("--out_dim", type=cmdline.number(int, lambda k: 1 <= k <= 2 ** 20, "an integer in [1, 2^20]"),
                   default=65536, help="K, the number of prototypes; 1024-8192 converges faster on small datasets")
    g.add_argument("--norm_last_layer", type=cmdline.bool_flag, default=True,
                   help="unit-norm prototypes: more stable; False improves ViT-S but can diverge")
    g.add_argument("--momentum_teacher", type=cmdline.probability, default=0.996,
                   help="m_0, cosine to 1 over training; raise it (0.9995) for small batches (256)")
    g.add_argument("--use_bn_in_head", type=cmdline.bool_flag, default=False,
                   help="BatchNorm in the head: official default for ResNets; the course preset's small ViT needs it")
    g.add_argument("--drop_path_rate", type=cmdline.below_one, default=0.1, help="stochastic depth, student only")
    g = p.add_argument_group("temperatures")
    g.add_argument("--warmup_teacher_temp", type=cmdline.positive_float, default=0.04,
                   help="tau_t at the start; too high and training does not start, so start low")
    g.add_argument("--teacher_temp", type=cmdline.positive_float, default=0.04,
                   help="tau_t after warm-up; above 0.07 is unstable; 0.07 with warm-up is the 'boosted' recipe")
    g.add_argument("--warmup_teacher_temp_epochs", type=cmdline.nonneg_int, default=0,
                   help="epochs of linear tau_t warm-up (30 in the boosted recipe)")
    g = p.add_argument_group("optimization")
    g.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 on CUDA and on CPUs with AMX (no loss scaling needed), fp32 elsewhere; "
                        "fp16 adds a GradScaler")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile student and teacher; default on for CUDA, off elsewhere")
    g.add_argument("--weight_decay", type=cmdline.nonneg_float, default=0.04,
                   help="start of the cosine weight-decay schedule")
    g.add_argument("--weight_decay_end", type=cmdline.nonneg_float, default=0.4,
                   help="end of the schedule: a larger wd late in training helps ViTs")
    g.add_argument("--clip_grad", type=cmdline.nonneg_float, default=3.0,
                   help="max gradient norm per parameter tensor (not global); 0 disables")
    g.add_argument("--batch_size_per_gpu", type=cmdline.positive_int, default=64, help="images per process and step")
    g.add_argument("--epochs", type=cmdline.positive_int, default=100, help="passes over the training set")
    g.add_argument("--steps", type=cmdline.nonneg_int, default=0,
                   help="if > 0, a budget of about this many iterations: sets the epochs from the dataset's size "
                        "(at least --epochs; shorter epochs on large datasets), warm-up and evaluation in proportion")
    g.add_argument("--freeze_last_layer", type=cmdline.nonneg_int, default=1,
                   help="epochs during which the prototypes get no gradient: eases the start")
    g.add_argument("--lr", type=cmdline.positive_float, default=5e-4,
                   help="peak lr at a total batch of 256, scaled linearly with the total batch")
    g.add_argument("--warmup_epochs", type=cmdline.nonneg_int, default=10, help="linear lr warm-up from 0")
    g.add_argument("--min_lr", type=cmdline.nonneg_float, default=1e-6, help="lr at the end of the cosine decay")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"],
                   help="adamw is the paper's choice for ViTs; sgd (momentum 0.9) for convnets")
    g = p.add_argument_group("multi-crop")
    g.add_argument("--global_crops_scale", type=cmdline.fraction, nargs=2, action=cmdline.OrderedPair,
                   default=(0.4, 1.0),
                   help="area range of the 2 global crops; (0.14, 1) when there are no local crops")
    g.add_argument("--local_crops_number", type=cmdline.nonneg_int, default=8, help="0 disables multi-crop")
    g.add_argument("--local_crops_scale", type=cmdline.fraction, nargs=2, action=cmdline.OrderedPair,
                   default=(0.05, 0.4),
                   help="area range of the local crops: small parts of the image")
    g.add_argument("--global_size", type=cmdline.positive_int, default=224, help="side of the global crops in pixels")
    g.add_argument("--local_size", type=cmdline.positive_int, default=96, help="side of the local crops in pixels")
    g = p.add_argument_group("data, output, runtime")
    g.add_argument("--data_path", default="textures",
                   help=f"an ImageFolder directory (its train/ when present) or one of {', '.join(data.BUILTIN)}")
    g.add_argument("--output_dir", default="runs/dino", help="checkpoints, log.txt, curves.png")
    g.add_argument("--saveckp_freq", type=cmdline.nonneg_int, default=20,
                   help="also keep checkpointNNNN.pth after epochs 0, N, 2N, ... (NNNN counts from 0, as official)")
    g.add_argument("--resume", default="auto",
                   help="'auto': continue from output_dir/checkpoint.pth if it exists; a path; or 'none'")
    g.add_argument("--eval_every", type=cmdline.nonneg_int, default=0, help="k-NN evaluation every N epochs (0: never)")
    g.add_argument("--seed", type=cmdline.seed, default=0, help="initial weights, data order and crops all follow it")
    g.add_argument("--num_workers", type=cmdline.nonneg_int, default=10, help="data-loading processes per GPU")
    g.add_argument("--log_freq", type=cmdline.positive_int, default=10,
                   help="steps between progress updates (each one syncs)")
    g = p.add_argument_group("speed")
    g.add_argument("--benchmark", type=cmdline.nonneg_int, default=0, metavar="N",
                   help="time N training steps on synthetic batches and exit")
    g.add_argument("--benchmark_data", type=cmdline.nonneg_int, default=0, metavar="N",
                   help="time N training steps with the real data loader and exit")
    g.add_argument("--reference_mode", action="store_true",
                   help="the official recipe for comparison (overrides --precision and --compile): fp16 + GradScaler "
                        "on CUDA (fp32 on CPU), eager, explicit attention, convolutional patch embedding, the "
                        "whole multi-crop per image in PIL")
    return p


def parse_args(argv=None):
    parser = get_args_parser()
    known, _ = parser.parse_known_args(argv)
    if known.preset:
        parser.set_defaults(**PRESETS[known.preset])
    return parser.parse_args(argv)


def check_args(args):
    """The rules across flags (each flag's own range is its argparse type), run before anything is written.
    Returns the checkpoint this run continues from, (path, state) checked against the flags, or None."""
    for name in ("global_size", "local_size"):
        if getattr(args, name) % args.patch_size:
            raise UsageError(f"--patch_size {args.patch_size} does not divide --{name} {getattr(args, name)}; "
                             f"choose crop sizes that are multiples of the patch size")
        if getattr(args, name) // args.patch_size > cmdline.MAX_SIDE:
            raise UsageError(f"--{name} {getattr(args, name)} is {getattr(args, name) // args.patch_size} patches "
                             f"of {args.patch_size} px per side, more than {cmdline.MAX_SIDE}; lower it or raise "
                             f"--patch_size")
    if args.warmup_epochs > args.epochs or args.warmup_teacher_temp_epochs > args.epochs:
        raise UsageError(f"--warmup_epochs ({args.warmup_epochs}) and --warmup_teacher_temp_epochs "
                         f"({args.warmup_teacher_temp_epochs}) cannot exceed --epochs ({args.epochs}); lower them")
    if args.benchmark or args.benchmark_data:  # nothing is read from or written to --output_dir
        return None
    cmdline.check_output_dir(args.output_dir)
    checkpoint = Path(args.output_dir) / "checkpoint.pth"
    if args.resume == "none" or (args.resume == "auto" and not checkpoint.exists()):
        return None
    path = checkpoint if args.resume == "auto" else Path(args.resume)
    return path, read_checkpoint(path, args, same_data=args.resume == "auto")


# ---------------------------------------------------------------------------- main
def main(args):
    dino, run = setup(args)
    if args.benchmark or args.benchmark_data:
        return benchmark.measure(train_step, dino, run)
    if run.rank == 0:
        print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
        print(f"device {run.device}, precision {run.precision}, compile {run.compiled}, "
              f"{run.world} process(es), {run.niter} iterations per epoch")
        ckpt.save_json(vars(args), run.out / "config.json")
        if run.resumed_from:
            print(f"resumed from {run.resumed_from} at epoch {run.start_epoch}, iteration {run.start_step}")
        if run.start_epoch >= args.epochs:
            print(f"nothing to train: {run.resumed_from} has all {args.epochs} epochs; raise --epochs to train on, "
                  f"or give a new run its own --output_dir")
    stop = runtime.Stop()
    handlers = {sig: signal.signal(sig, stop) for sig in runtime.STOP_SIGNALS}
    try:
        return fit(dino, run, stop)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def cli(argv=None):
    try:
        return cmdline.run(main, parse_args, argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli())
