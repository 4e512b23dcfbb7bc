"""DINO training: the numbered concepts composed into the loop of the paper's Algorithm 1 and the
official main_dino.py, on one CPU, one GPU, or many through torchrun.

    python train.py --arch vit_small --patch 8 --data_path DIR    # the paper's recipe on an ImageNet-style folder
    python train.py --preset cpu_course                           # a small ViT on the embedded textures, 2-core CPU
    torchrun --nproc_per_node=8 train.py --data_path /imagenet    # data-parallel

Read top to bottom: one iteration of Algorithm 1 (`train_step`) and the three rules around it
(clipping, the frozen last layer, the schedules); the epoch loop; how `setup` builds a run from the
arguments. The arguments themselves, with their defaults and the presets, are in arguments.py; devices,
processes and signals in runtime.py; the loader in loader.py; checkpoints and resuming in checkpoint.py;
log.txt, messages and curves in monitor.py.
"""
import argparse
import contextlib
import copy
import dataclasses
import importlib
import os
import signal
import sys
import time
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
from arguments import check_args, parse_args
from cli import UsageError
from runtime import autocast_dtype
from loader import DeviceBatches, batch_seconds, training_loader

multicrop = importlib.import_module("01_multicrop")
vits = importlib.import_module("02_vit")
heads = importlib.import_module("03_head")
losses = importlib.import_module("04_loss")
ema = importlib.import_module("05_teacher_ema")
knn = importlib.import_module("06_knn")


# ---------------------------------------------------------------------------- Algorithm 1
@dataclasses.dataclass
class Schedules:
    """One value per iteration (epochs x iterations per epoch), as the official code."""
    lr: np.ndarray  # linear warm-up to lr x total batch / 256, then cosine to min_lr
    wd: np.ndarray  # weight decay, cosine from weight_decay to weight_decay_end
    momentum: np.ndarray  # teacher momentum m, cosine from momentum_teacher to 1


@dataclasses.dataclass
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
        # exercise multicrop: teacher_output from the 2 global crops only, student_output from every crop
        teacher_output = dino.teacher(crops[:2])  # (2B, K): the teacher sees only the global crops
        student_output = dino.student(crops)  # (V B, K): the student sees them all
        # end exercise
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
@dataclasses.dataclass
class Budget:
    """What the run does: the flags' epochs, or with --steps N about N iterations whatever the dataset's size,
    the epochs and the epoch-valued flags fitted to them (fit_to_budget)."""
    epochs: int
    niter: int  # iterations per epoch
    warmup_epochs: int
    warmup_teacher_temp_epochs: int
    freeze_last_layer: int
    eval_every: int  # k-NN evaluation every this many epochs; 0: never

    def config(self, args):
        """The arguments with the values this run uses: config.json, and the "args" of its checkpoints."""
        return dict(vars(args), **{k: v for k, v in dataclasses.asdict(self).items() if k != "niter"})


@dataclasses.dataclass
class Run:
    """Where a run's data comes from, where its results go, and where it stands."""
    args: argparse.Namespace
    budget: Budget
    device: torch.device
    precision: str  # fp32, bf16 or fp16
    compiled: bool  # student and teacher went through torch.compile
    rank: int  # this process, of `world`
    world: int
    loader: DeviceBatches  # batches of finished crops [g1, g2, l1..lN] on the device; its sampler resumes
    workers: int  # data-loading processes
    out: Path  # --output_dir
    shrink: int = None  # the shorter side (px) large images are shrunk to, once (images.ShrunkImages)
    start_epoch: int = 0  # where a resumed run continues
    start_step: int = 0
    log_rows: list = None  # log.txt rows of the epochs already done
    resumed_from: Path = None
    why: str = ""  # the automatic choices (precision, loader workers) and their reasons

    @property
    def niter(self):  # iterations per epoch
        return self.budget.niter


def fit(dino, run, stop):
    """Epochs until the budget's last, with a checkpoint after each (ckpt.RunCheckpoints says when one is
    written; always when stopped mid-epoch) and a line of log.txt; k-NN every eval_every epochs."""
    args, budget, out, epoch, step = run.args, run.budget, run.out, run.start_epoch, run.start_step
    checkpoints, config = ckpt.RunCheckpoints(out, args.saveckp_freq), budget.config(args)
    def knn_of(net):  # 20-NN (top-1, top-5) on val/
        return knn.evaluate(net, args.data_path, args.global_size, run.device, (20,), batch_size=256,
                            num_workers=run.workers, dtype=autocast_dtype(run.precision), shrink=run.shrink)[20]
    knn_init = next((r["knn_init"] for r in run.log_rows if r.get("knn_init") is not None), None)
    if budget.eval_every and not run.log_rows and not step:  # the network before training: the k-NN to beat
        knn_init = knn_of(dino.teacher.backbone)[0]
        if run.rank == 0:
            print(f"k-NN top-1 before training: {knn_init:.1f}%")
    while epoch < budget.epochs:
        run.loader.sampler.set_epoch(epoch)
        run.loader.sampler.skip = step * args.batch_size_per_gpu  # a run stopped mid-epoch resumes at its next batch
        dino.student.train()
        row = train_one_epoch(dino, run, epoch, step, stop)
        if row is None:  # a non-finite loss: stop before anything is written
            return 1
        step += row["steps"]
        done, last = step == budget.niter, epoch + 1 == budget.epochs
        if done and budget.eval_every and ((epoch + 1) % budget.eval_every == 0 or last):
            row["knn_top1"], row["knn_top5"] = knn_of(dino.teacher.backbone)
            row["knn_init"] = knn_init  # None where a resumed run has lost it
        if run.rank == 0:  # the log row first: a checkpoint never holds an epoch that log.txt lacks
            state = ckpt.checkpoint_state(dino, config, epoch + 1 if done else epoch, 0 if done else step)
            due = checkpoints.due(done, last or stop.requested)
            if done:
                row.update(epoch=epoch, out_dim=args.out_dim, teacher_temp=dino.loss_fn.teacher_temp(epoch))
                monitor.log_epoch(row, run.log_rows, out, draw=due)
            checkpoints.save(state, epoch, done, due)
        if not done or stop.requested:  # stopped by a signal
            if run.rank == 0:
                print(f"stopped at iteration {step}/{budget.niter} of epoch {epoch}; saved {out / 'checkpoint.pth'}; "
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
        print("\n" + monitor.non_finite_message(int(first_bad.item()), epoch, run.out / "checkpoint.pth"),
              file=sys.stderr)
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
    """The Budget of a run whose epochs have `batches` batches. With --steps N, about N iterations whatever the
    dataset's size: more epochs than --epochs on a small dataset, epochs cut to N / --epochs batches of a fresh
    shuffle on a large one. Warm-up, the frozen last layer and evaluation keep their share of the run."""
    if not args.steps:
        return Budget(args.epochs, batches, args.warmup_epochs, args.warmup_teacher_temp_epochs,
                      args.freeze_last_layer, args.eval_every)
    epochs = max(args.epochs, round(args.steps / batches))
    scale = epochs / args.epochs
    # eval_every rounded up: every 3 of 6 epochs is every 21 of 41 (k-NN at epochs 20 and 40), not 20 (19, 39, 40)
    return Budget(epochs, min(batches, round(args.steps / epochs)), round(args.warmup_epochs * scale),
                  round(args.warmup_teacher_temp_epochs * scale), round(args.freeze_last_layer * scale),
                  -(-args.eval_every * epochs // args.epochs))


def build_data(args):
    """The training set, (dataset, augment, shrink). One sample = the 2 + N crops of one image. By default the
    recipe is split (multicrop_fast.py): decode, crops and flips per image in the loader (uint8), the colour
    operations batched (`augment`) where the model runs (in the loader on a CPU-only run); --reference_mode runs
    the whole recipe per image in PIL, as the official code. Files far larger than these crops need (phone photos
    for 32 px crops) are decoded once, shrunk to `shrink` px and kept in memory (not in --reference_mode): every
    crop and the evaluation's resize still come from twice their pixels."""
    crop_args = (tuple(args.global_crops_scale), tuple(args.local_crops_scale), args.local_crops_number,
                 args.global_size, args.local_size)
    if args.reference_mode:
        transform, augment, read, shrink = multicrop.DataAugmentationDINO(*crop_args), None, None, None
    else:
        transform = multicrop_fast.DataAugmentationDINOSplit(*crop_args)
        augment, read = transform.photometric, images.path_if_jpeg
        shrink = images.shrink_side(
            [(args.global_size, args.global_crops_scale[0]), (knn.eval_resize(args.global_size), None)] +
            [(args.local_size, args.local_crops_scale[0])] * bool(args.local_crops_number))
    dataset = data.build_dataset(args.data_path, "pretrain", transform, loader=read, shrink=shrink)
    return dataset, augment, shrink


def loader_workers(args, dataset, augment, device, dino):
    """(workers, reason). --num_workers auto: on a GPU the official 10, at most one per core; on a CPU-only run
    the number that paces training best (runtime.choose_workers), from one batch of crops made here and a
    training step timed on it (on a copy of the models). Leaves torch the cores the workers do not take."""
    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    if args.num_workers != "auto" or device.type != "cpu":
        workers = min(10 if args.num_workers == "auto" else args.num_workers, cores)
        why = "--num_workers" if args.num_workers != "auto" else "auto, on a GPU: 10 as official, at most the cores"
    else:
        crops_s, crops = batch_seconds(dataset, args.batch_size_per_gpu, args.seed, augment)
        trial = copy.deepcopy(dino)
        for _ in range(2):  # the second is timed: the first allocates
            t0 = time.perf_counter()
            train_step(trial, crops, 0, 0)[0].item()
        step_s = time.perf_counter() - t0
        workers = runtime.choose_workers(crops_s, step_s, threads, cores)
        why = (f"auto: a batch of crops takes {1000 * crops_s:.0f} ms to make, a step {1000 * step_s:.0f} ms on "
               f"{threads} threads")
    if device.type == "cpu":  # the workers need cores too
        torch.set_num_threads(max(1, min(threads, cores - workers)))
    return workers, why


def build_dino(args, budget, device, precision, world):
    """Student and teacher on the device, the loss with its centre, the optimizer and the schedules."""
    student, teacher = build_models(args)
    if world > 1 and device.type == "cuda" and args.use_bn_in_head:  # BatchNorm statistics of the global batch
        student, teacher = map(nn.SyncBatchNorm.convert_sync_batchnorm, (student, teacher))
    student, teacher = student.to(device), teacher.to(device)
    for m in list(student.modules()) + list(teacher.modules()):
        if args.reference_mode and isinstance(m, (vits.Attention, vits.PatchEmbed)):
            m.fused = False  # the official computations
        if device.type == "cpu" and precision != "fp32" and isinstance(m, vits.Attention):
            m.fused = False  # PyTorch's CPU flash-attention backward is slower in bf16 than the explicit softmax
    loss_fn = losses.DINOLoss(args.out_dim, 2 + args.local_crops_number, args.warmup_teacher_temp,
                              args.teacher_temp, budget.warmup_teacher_temp_epochs, budget.epochs).to(device)
    opt_kw = {"fused": True} if device.type in ("cuda", "cpu") else {}  # one kernel for all parameters
    optimizer = (torch.optim.AdamW(params_groups(student), **opt_kw) if args.optimizer == "adamw" else
                 torch.optim.SGD(params_groups(student), lr=0, momentum=0.9))
    epochs, niter, total_batch = budget.epochs, budget.niter, args.batch_size_per_gpu * world
    schedule = Schedules(
        lr=ema.cosine_scheduler(args.lr * total_batch / 256, args.min_lr, epochs, niter, budget.warmup_epochs),
        wd=ema.cosine_scheduler(args.weight_decay, args.weight_decay_end, epochs, niter),
        momentum=ema.cosine_scheduler(args.momentum_teacher, 1.0, epochs, niter))
    dtype = autocast_dtype(precision)
    return DINO(student, teacher, loss_fn, optimizer, torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                schedule, torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext(),
                args.clip_grad, budget.freeze_last_layer)


def setup(args):
    """The DINO state and the Run around it, from the arguments; a resumed run continues where it stopped.
    Used by main() and, piece by piece, by the tests and notebooks."""
    rank, world, local_rank = runtime.init_distributed()
    device = runtime.pick_device(local_rank)
    cuda = device.type == "cuda"
    if args.reference_mode:  # the official computations: fp16 with a GradScaler on GPUs, eager
        precision, use_compile = ("fp16" if cuda else "fp32"), False
        precision_why = "--reference_mode"
    else:
        precision, precision_why = (args.precision, "--precision") if args.precision != "auto" else \
            runtime.auto_precision(device)
        use_compile = cuda if args.compile is None else args.compile
    resume = check_args(args)  # (path, state) of the checkpoint to continue from, or None
    runtime.seed_everything(args.seed)  # the same initial weights on every rank: the teacher is copied before DDP
    dataset, augment, shrink = build_data(args)
    if len(dataset) < args.batch_size_per_gpu * world:
        raise UsageError(f"the dataset has {len(dataset)} images, fewer than one batch of "
                         f"{args.batch_size_per_gpu * world} (batches are full, drop_last); lower --batch_size_per_gpu")
    def loader(workers):
        return training_loader(dataset, args.batch_size_per_gpu, workers, args.seed, rank, world, device, augment)
    budget = fit_to_budget(args, len(loader(0)))
    if budget.eval_every and not data.has_val(args.data_path):
        print(f"note: {args.data_path} has no val/ folder, so there is no k-NN evaluation during training",
              file=sys.stderr)
        budget = dataclasses.replace(budget, eval_every=0)
    elif budget.eval_every and args.data_path not in data.BUILTIN:  # a val class train lacks: now, not epochs later
        knn.match_classes(dataset, data.build_dataset(args.data_path, "val"))  # dataset is train/ here
    dino = build_dino(args, budget, device, precision, world)
    workers, workers_why = loader_workers(args, dataset, augment, device, dino)
    out = Path(args.output_dir)
    run = Run(args, budget, device, precision, use_compile, rank, world, loader(workers), workers, out, shrink,
              log_rows=[], why=f"precision {precision}: {precision_why}; {workers} loader workers: {workers_why}")
    if resume:
        path, state = resume
        run.start_epoch, run.start_step = ckpt.load_checkpoint(state, path, dino, budget.niter)
        run.log_rows = monitor.read_log(out / "log.txt", run.start_epoch, rewrite=rank == 0)
        run.resumed_from = path if run.start_epoch or run.start_step else None
    if use_compile:  # in place: state-dict keys stay the same; one graph per crop resolution
        for m in (dino.student.backbone, dino.student.head, dino.teacher.backbone, dino.teacher.head):
            m.compile(dynamic=False)
    if world > 1:
        dino.student = nn.parallel.DistributedDataParallel(dino.student, device_ids=[local_rank] if cuda else None)
    if rank == 0 and not (args.benchmark or args.benchmark_data):  # last: bad input, found above, creates nothing
        runtime.check_writable(out, ckpt.checkpoint_bytes(dino))
    return dino, run


# ---------------------------------------------------------------------------- main
def main(args):
    dino, run = setup(args)
    if run.rank == 0:
        print(run.why)
    if args.benchmark or args.benchmark_data:
        return benchmark.measure(train_step, dino, run)
    if run.rank == 0:
        config, given = run.budget.config(args), vars(args)
        print("\n".join(f"{k}: {v}" + (f" (computed; --{k} {given[k]})" if v != given[k] else "")
                        for k, v in sorted(config.items())))
        print(f"device {run.device}, precision {run.precision}, compile {run.compiled}, "
              f"{run.world} process(es), {run.niter} iterations per epoch")
        monitor.write_config(config, run.out)
        if run.resumed_from:
            print(f"resumed from {run.resumed_from} at epoch {run.start_epoch}, iteration {run.start_step}")
        if run.start_epoch >= run.budget.epochs:
            print(f"nothing to train: {run.resumed_from} has all {run.budget.epochs} epochs; raise --epochs to train "
                  f"on, or give a new run its own --output_dir")
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
