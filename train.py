"""DINO training: the numbered concepts composed into the loop of the paper's Algorithm 1 and the
official main_dino.py, on one CPU, one GPU, or many through torchrun.

    python train.py --arch vit_small --patch 8                    # the paper's recipe on ImageNet-style data
    python train.py --preset cpu_course                           # a small ViT on the embedded textures, 2-core CPU
    torchrun --nproc_per_node=8 train.py --data_path /imagenet    # data-parallel

Each iteration: lr, weight decay and teacher momentum for this iteration -> teacher on the 2 global
crops, student on all crops -> loss (centering + sharpening) -> backward -> per-parameter gradient
clipping -> drop the last layer's gradients in the first epoch(s) -> optimizer step -> EMA teacher.
"""
import argparse
import contextlib
import importlib
import itertools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import checkpoint as ckpt
import data

multicrop = importlib.import_module("01_multicrop")
vits = importlib.import_module("02_vit")
heads = importlib.import_module("03_head")
losses = importlib.import_module("04_loss")
ema = importlib.import_module("05_teacher_ema")
knn = importlib.import_module("06_knn")

# A small recipe for a 2-core CPU (about 7 minutes with its k-NN evaluations): patch 8 on 32 px crops
# (4 x 4 patches) and 2 local crops keep a step cheap; batch 64 gives more steps in the time; K = 256
# prototypes for 5000 images; a low teacher temperature (0.02) and momentum 0.99. BatchNorm in the head
# (an official option, off for ViTs): the CLS features of a freshly initialised ViT point alike (mean
# pairwise cosine 0.62 on textures, still 0.61 after the head, 0.18 with BatchNorm); without it the
# teacher's output stayed near uniform (h(P_t) 4.5-4.7 of log K = 5.5) and k-NN reached 48.7 % against
# 87.0 % with it (44.2 % at random init). Six epochs of 78 steps leave no room for a 10-epoch lr warm-up or a
# frozen last layer, so: one warm-up epoch to lr 2e-3, no freezing, no stochastic depth in a 6-block ViT, and
# local crops of at least 10 % of the image (5 % of 32 x 32 px is a 7 px patch of texture).
# Explicit flags still override it.
PRESETS = {
    "cpu_course": dict(arch="vit_nano", patch_size=8, data_path="textures", global_size=32, local_size=16,
                       local_crops_number=2, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.1, 0.4),
                       out_dim=256, use_bn_in_head=True, batch_size_per_gpu=64, epochs=6, warmup_epochs=1,
                       lr=2e-3, min_lr=1e-5,
                       momentum_teacher=0.99, warmup_teacher_temp=0.02, teacher_temp=0.02,
                       warmup_teacher_temp_epochs=0, freeze_last_layer=0, drop_path_rate=0.0, num_workers=1,
                       eval_every=3, saveckp_freq=0, output_dir="runs/cpu_course"),
}


def bool_flag(s):
    if s.lower() in ("true", "1", "yes", "on"):
        return True
    if s.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def get_args_parser():
    p = argparse.ArgumentParser("DINO", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named set of defaults (explicit flags still win)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="vit_small", help=f"one of {', '.join(vits.ARCHS)}")
    g.add_argument("--patch_size", "--patch", type=int, default=16,
                   help="smaller patches: better features, quadratically more tokens; "
                        "with patches < 16 the authors train in fp32 (fp16 overflows), bf16 is fine")
    g.add_argument("--out_dim", type=int, default=65536,
                   help="K, the number of prototypes; 1024-8192 converges faster on small datasets")
    g.add_argument("--norm_last_layer", type=bool_flag, default=True,
                   help="unit-norm prototypes: more stable; False improves ViT-S but can diverge")
    g.add_argument("--momentum_teacher", type=float, default=0.996,
                   help="m_0, cosine to 1 over training; raise it (0.9995) for small batches (256)")
    g.add_argument("--use_bn_in_head", type=bool_flag, default=False, help="BatchNorm in the head (ResNets)")
    g.add_argument("--drop_path_rate", type=float, default=0.1, help="stochastic depth, student only")
    g = p.add_argument_group("temperatures")
    g.add_argument("--warmup_teacher_temp", type=float, default=0.04,
                   help="tau_t at the start; too high and training does not start, so start low")
    g.add_argument("--teacher_temp", type=float, default=0.04,
                   help="tau_t after warm-up; above 0.07 is unstable; 0.07 with warm-up is the 'boosted' recipe")
    g.add_argument("--warmup_teacher_temp_epochs", type=int, default=0,
                   help="epochs of linear tau_t warm-up (30 in the boosted recipe)")
    g = p.add_argument_group("optimization")
    g.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto: bf16 on CUDA (no loss scaling needed), fp32 elsewhere; fp16 adds a GradScaler")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile student and teacher; default on for CUDA, off elsewhere")
    g.add_argument("--weight_decay", type=float, default=0.04, help="start of the cosine weight-decay schedule")
    g.add_argument("--weight_decay_end", type=float, default=0.4,
                   help="end of the schedule: a larger wd late in training helps ViTs")
    g.add_argument("--clip_grad", type=float, default=3.0,
                   help="max gradient norm per parameter tensor (not global); 0 disables")
    g.add_argument("--batch_size_per_gpu", type=int, default=64, help="images per process and step")
    g.add_argument("--epochs", type=int, default=100, help="passes over the training set")
    g.add_argument("--freeze_last_layer", type=int, default=1,
                   help="epochs during which the prototypes get no gradient: eases the start")
    g.add_argument("--lr", type=float, default=5e-4,
                   help="peak lr at a total batch of 256, scaled linearly with the total batch")
    g.add_argument("--warmup_epochs", type=int, default=10, help="linear lr warm-up from 0")
    g.add_argument("--min_lr", type=float, default=1e-6, help="lr at the end of the cosine decay")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"],
                   help="adamw is the paper's choice for ViTs; sgd (momentum 0.9) for convnets")
    g = p.add_argument_group("multi-crop")
    g.add_argument("--global_crops_scale", type=float, nargs=2, default=(0.4, 1.0),
                   help="area range of the 2 global crops; (0.14, 1) when there are no local crops")
    g.add_argument("--local_crops_number", type=int, default=8, help="0 disables multi-crop")
    g.add_argument("--local_crops_scale", type=float, nargs=2, default=(0.05, 0.4),
                   help="area range of the local crops: small parts of the image")
    g.add_argument("--global_size", type=int, default=224, help="side of the global crops in pixels")
    g.add_argument("--local_size", type=int, default=96, help="side of the local crops in pixels")
    g = p.add_argument_group("data, output, runtime")
    g.add_argument("--data_path", default="textures",
                   help=f"an ImageFolder directory (its train/ when present) or one of {', '.join(data.BUILTIN)}")
    g.add_argument("--output_dir", default="runs/dino", help="checkpoints, log.txt, curves.png")
    g.add_argument("--saveckp_freq", type=int, default=20,
                   help="also keep checkpointNNNN.pth after epochs 0, N, 2N, ... (NNNN counts from 0, as official)")
    g.add_argument("--resume", default="auto",
                   help="'auto': continue from output_dir/checkpoint.pth if it exists; a path; or 'none'")
    g.add_argument("--eval_every", type=int, default=0, help="k-NN evaluation every N epochs (0: never)")
    g.add_argument("--seed", type=int, default=0, help="initial weights, data order and crops all follow it")
    g.add_argument("--num_workers", type=int, default=10, help="data-loading processes per GPU")
    g.add_argument("--log_freq", type=int, default=10, help="steps between progress updates (each one syncs)")
    g = p.add_argument_group("speed")
    g.add_argument("--benchmark", type=int, default=0, metavar="N",
                   help="time N training steps on synthetic batches and exit")
    g.add_argument("--benchmark_data", type=int, default=0, metavar="N",
                   help="time N training steps with the real data loader and exit")
    g.add_argument("--reference_mode", action="store_true",
                   help="the official recipe for comparison: fp16 + GradScaler, eager, explicit attention, "
                        "convolutional patch embedding")
    return p


def parse_args(argv=None):
    parser = get_args_parser()
    known, _ = parser.parse_known_args(argv)
    if known.preset:
        parser.set_defaults(**PRESETS[known.preset])
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- setup
class UsageError(Exception):
    """Bad command-line input: the message names the problem and the fix."""


def check_args(args):
    if args.arch not in vits.ARCHS:
        raise UsageError(f"unknown --arch {args.arch}; choose from {', '.join(vits.ARCHS)}")
    for name in ("global_size", "local_size"):
        if getattr(args, name) % args.patch_size:
            raise UsageError(f"--patch_size {args.patch_size} does not divide --{name} {getattr(args, name)}; "
                             f"choose crop sizes that are multiples of the patch size")
    if args.local_crops_number < 0:
        raise UsageError(f"--local_crops_number must be >= 0, got {args.local_crops_number}")
    if args.batch_size_per_gpu < 1 or args.epochs < 1:
        raise UsageError("--batch_size_per_gpu and --epochs must be positive")
    if args.warmup_epochs > args.epochs or args.warmup_teacher_temp_epochs > args.epochs:
        raise UsageError(f"--warmup_epochs ({args.warmup_epochs}) and --warmup_teacher_temp_epochs "
                         f"({args.warmup_teacher_temp_epochs}) cannot exceed --epochs ({args.epochs}); lower them")
    if not 0 <= args.momentum_teacher <= 1:
        raise UsageError(f"--momentum_teacher must lie in [0, 1], got {args.momentum_teacher}")


def init_distributed():
    """(rank, world_size, local_rank); a process group only under torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def pick_device(local_rank):
    # tiny values (e.g. Adam's second moments of near-zero gradients) are slow to compute with on CPUs
    torch.set_flush_denormal(True)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler whose indices also carry the epoch (epoch * n + i), so that each sample's
    crops are drawn from a generator seeded by (seed, epoch, index): the same crops whatever the
    number of workers, and a resumed run sees exactly what an uninterrupted one would."""

    skip = 0  # indices of this epoch already consumed before a resume

    def __iter__(self):
        n = len(self.dataset)
        return (self.epoch * n + i for i in itertools.islice(super().__iter__(), self.skip, None))


class SeededCrops(torch.utils.data.Dataset):
    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = divmod(key, len(self.dataset))
        with torch.random.fork_rng(devices=[]):  # leave the caller's generator as it was
            torch.manual_seed(hash((self.seed, epoch, i)) % 2 ** 62)  # a tuple of ints hashes the same every run
            return self.dataset[i]


def ignore_sigint(_):
    """Ctrl-C reaches every process of the terminal; the workers leave it to the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)


# ---------------------------------------------------------------------------- one step
def train_step(batch, it, epoch, ctx):
    """One DINO iteration (Algorithm 1). Returns the loss and diagnostics as tensors: no host sync."""
    student, teacher, loss_fn, optimizer, scaler, sched, args = (
        ctx[k] for k in ("student", "teacher", "loss_fn", "optimizer", "scaler", "sched", "args"))
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = float(sched["lr"][it])  # plain floats: the checkpoint must load with weights_only
        if i == 0:  # only the weight matrices are regularised
            group["weight_decay"] = float(sched["wd"][it])
    with ctx["autocast"]:
        teacher_output = teacher(batch[:2])  # (2B, K): the teacher sees only the global crops
        student_output = student(batch)  # (V B, K)
        loss, diag = loss_fn(student_output, teacher_output, epoch, return_diagnostics=True)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if args.clip_grad:
        clip_gradients(student, args.clip_grad)
    cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
    scaler.step(optimizer)
    scaler.update()
    ema.ema_update(teacher, unwrap(student), sched["momentum"][it])
    return loss.detach(), diag


def unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------- logging
def collapse_message(entropy, kl, K):
    """Plain words for the two collapse modes of Sec. 5.3 (both have KL(P_t || P_s) near 0)."""
    if kl > 0.01 * math.log(K):
        return None
    if entropy > 0.9 * math.log(K):
        return (f"collapse: the teacher's output is uniform (h(P_t) = {entropy:.2f} ~ log K = {math.log(K):.2f}) and "
                f"the student copies it (KL = {kl:.3f}). Centering is winning over sharpening: lower --teacher_temp "
                f"(e.g. 0.02-0.04), use a smaller --out_dim on small data, a longer --warmup_epochs or a lower --lr.")
    if entropy < 0.1 * math.log(K):
        return (f"collapse: one dimension dominates the teacher (h(P_t) = {entropy:.2f} ~ 0, KL = {kl:.3f}). "
                f"Sharpening is winning: check that centering is on, raise --teacher_temp slightly, "
                f"or lower --lr.")
    return None


def plot_curves(log_rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [("loss", "loss = h + KL"), ("entropy", "teacher entropy h(P_t)"), ("kl", "KL(P_t || P_s)"),
            ("knn_top1", "k-NN top-1 (%)"), ("lr", "learning rate"), ("momentum", "teacher momentum")]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    epochs = [r["epoch"] for r in log_rows]
    for ax, (k, title) in zip(axes.flat, keys):
        pts = [(r["epoch"], r[k]) for r in log_rows if r.get(k) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3)
        if k == "entropy" and log_rows:
            ax.axhline(math.log(log_rows[-1]["out_dim"]), color="gray", ls="--", label="log K")
            ax.axhline(0, color="gray", ls=":")
            ax.legend()
        ax.set_title(title), ax.set_xlabel("epoch")
        ax.set_xlim(min(epochs, default=0) - 0.5, max(epochs, default=0) + 0.5)
    fig.tight_layout()
    tmp = Path(path).with_name(".curves.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- main
class Stop:
    """Ctrl-C / SIGTERM: finish the current step, checkpoint, exit cleanly."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:  # a second Ctrl-C: the user means it
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint...", file=sys.stderr)

    def agreed(self, log_point, device):
        """One process decides alone, at every step; several agree at log points, so all stop at the same step."""
        if not dist.is_initialized():
            return self.requested
        if not log_point:
            return False
        flag = torch.tensor(float(self.requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def setup(args):
    """Everything training needs, in a dict: device, data, models, loss, optimizer, schedules, and the
    state of a resumed run. Used by main() and, piece by piece, by the tests and notebooks."""
    rank, world, local_rank = init_distributed()
    device = pick_device(local_rank)
    cuda = device.type == "cuda"
    if args.reference_mode:
        args.precision, args.compile = ("fp16" if cuda else "fp32"), False
    precision = args.precision if args.precision != "auto" else ("bf16" if cuda else "fp32")
    use_compile = cuda if args.compile is None else args.compile
    check_args(args)
    seed_everything(args.seed)  # the same initial weights on every rank: the teacher is copied before DDP
    out = Path(args.output_dir)
    benchmarking = args.benchmark or args.benchmark_data

    # data: one sample = the list of 2 + N crops of one image
    transform = multicrop.DataAugmentationDINO(tuple(args.global_crops_scale), tuple(args.local_crops_scale),
                                               args.local_crops_number, args.global_size, args.local_size)
    dataset = data.build_dataset(args.data_path, "pretrain", transform)
    total_batch = args.batch_size_per_gpu * world
    if len(dataset) < total_batch:
        raise UsageError(f"the dataset has {len(dataset)} images, fewer than one batch of {total_batch} "
                         f"(batches are full, drop_last); lower --batch_size_per_gpu")
    if rank == 0 and not benchmarking:  # after the checks above: bad input creates nothing
        probe = out / ".write_test"
        try:  # fail now, not after an epoch of training
            out.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"0" * (1 << 20)), probe.unlink()
        except OSError as e:
            raise UsageError(f"cannot write to --output_dir {out} ({e.strerror or e}); choose a writable directory "
                             f"with free space") from None
    sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    workers = min(args.num_workers, os.cpu_count() or 1)
    if device.type == "cpu":  # the augmentation workers need cores too
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - workers)))
    loader = torch.utils.data.DataLoader(
        SeededCrops(dataset, args.seed), sampler=sampler, batch_size=args.batch_size_per_gpu, num_workers=workers,
        pin_memory=cuda, drop_last=True, persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
        worker_init_fn=ignore_sigint)
    niter = len(loader)

    # models, loss, optimizer, schedules
    student, teacher = build_models(args)
    if world > 1 and cuda and args.use_bn_in_head:  # BatchNorm statistics over the global batch, as official
        student, teacher = map(nn.SyncBatchNorm.convert_sync_batchnorm, (student, teacher))
    student, teacher = student.to(device), teacher.to(device)
    if args.reference_mode:
        for m in list(student.modules()) + list(teacher.modules()):
            if isinstance(m, (vits.Attention, vits.PatchEmbed)):
                m.fused = False
    ncrops = 2 + args.local_crops_number
    loss_fn = losses.DINOLoss(args.out_dim, ncrops, args.warmup_teacher_temp, args.teacher_temp,
                              args.warmup_teacher_temp_epochs, args.epochs).to(device)
    opt_kw = {"fused": True} if device.type in ("cuda", "cpu") else {}  # one kernel for all parameters
    optimizer = (torch.optim.AdamW(params_groups(student), **opt_kw) if args.optimizer == "adamw" else
                 torch.optim.SGD(params_groups(student), lr=0, momentum=0.9))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    sched = {  # one value per iteration, as the official code
        "lr": ema.cosine_scheduler(args.lr * total_batch / 256, args.min_lr, args.epochs, niter, args.warmup_epochs),
        "wd": ema.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter),
        "momentum": ema.cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, niter),
    }
    start_epoch, start_step, log_rows = 0, 0, []
    resume = out / "checkpoint.pth" if args.resume == "auto" else (None if args.resume == "none" else Path(args.resume))
    if resume is not None and (resume.exists() or args.resume != "auto") and not benchmarking:
        state = ckpt.load_file(resume)
        if not isinstance(state, dict) or not {"student", "teacher", "optimizer", "dino_loss", "epoch"} <= set(state):
            raise ckpt.CheckpointError(f"{resume} is not a train.py checkpoint (needs student, teacher, optimizer, "
                                       f"dino_loss, epoch); 06_knn.py and 07_attention.py take backbone files")
        ckpt.load_strict(student, state["student"], f"{resume} (student)")
        ckpt.load_strict(teacher, state["teacher"], f"{resume} (teacher)")
        ckpt.load_strict(loss_fn, state["dino_loss"], f"{resume} (dino_loss)")
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_step = state["epoch"], state.get("step", 0)
        log_file = out / "log.txt"
        log_rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()] \
            if log_file.exists() else []
        log_rows = [r for r in log_rows if r["epoch"] < start_epoch]
    if use_compile:  # in place: state-dict keys stay the same; one graph per crop resolution
        for m in (student.backbone, student.head, teacher.backbone, teacher.head):
            m.compile(dynamic=False)
    if world > 1:
        student = nn.parallel.DistributedDataParallel(student, device_ids=[local_rank] if cuda else None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return dict(student=student, teacher=teacher, loss_fn=loss_fn, optimizer=optimizer,
                scaler=scaler, sched=sched, args=args, dtype=dtype, precision=precision, compiled=use_compile,
                autocast=torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext(),
                loader=loader, sampler=sampler, niter=niter, ncrops=ncrops, workers=workers, device=device,
                rank=rank, world=world, out=out, start_epoch=start_epoch, start_step=start_step, log_rows=log_rows,
                resumed_from=resume if start_epoch or start_step else None)


def main(args):
    ctx = setup(args)
    rank, out = ctx["rank"], ctx["out"]
    if args.benchmark or args.benchmark_data:
        import benchmark
        return benchmark.run(ctx)
    if rank == 0:
        print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
        print(f"device {ctx['device']}, precision {ctx['precision']}, compile {ctx['compiled']}, "
              f"{ctx['world']} process(es), {ctx['niter']} iterations per epoch")
        ckpt.save_json(vars(args), out / "config.json")
        if ctx["resumed_from"]:
            print(f"resumed from {ctx['resumed_from']} at epoch {ctx['start_epoch']}, iteration {ctx['start_step']}")
    stop = Stop()
    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return fit(ctx, stop)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def fit(ctx, stop):
    args, rank, out, loss_fn, niter = ctx["args"], ctx["rank"], ctx["out"], ctx["loss_fn"], ctx["niter"]
    log_rows, epoch, step = ctx["log_rows"], ctx["start_epoch"], ctx["start_step"]
    while epoch < args.epochs:
        ctx["sampler"].set_epoch(epoch)
        ctx["sampler"].skip = step * args.batch_size_per_gpu  # a run stopped mid-epoch resumes at its next batch
        ctx["student"].train()
        row = train_one_epoch(epoch, step, ctx, stop)
        if row is None:  # a non-finite loss: stop before anything is written
            return 1
        step += row["steps"]
        done = step == niter
        if done and args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            res = knn.evaluate(ctx["teacher"].backbone, args.data_path, args.global_size, ctx["device"], (20,),
                               batch_size=256, num_workers=ctx["workers"], dtype=ctx["dtype"])
            row["knn_top1"], row["knn_top5"] = res[20]
        state = {"student": unwrap(ctx["student"]).state_dict(), "teacher": ctx["teacher"].state_dict(),
                 "optimizer": ctx["optimizer"].state_dict(), "dino_loss": loss_fn.state_dict(),
                 "epoch": epoch + 1 if done else epoch, "step": 0 if done else step,
                 "args": vars(args), "scaler": ctx["scaler"].state_dict()}
        if rank == 0:
            ckpt.save_atomic(state, out / "checkpoint.pth")
            if done and args.saveckp_freq and epoch % args.saveckp_freq == 0:  # named as the official ones
                ckpt.save_atomic(state, out / f"checkpoint{epoch:04d}.pth")  # 0000: after the first epoch
            if done:
                row.update(epoch=epoch, out_dim=args.out_dim, teacher_temp=loss_fn.teacher_temp(epoch))
                log_rows.append(row)
                with open(out / "log.txt", "a") as f:
                    f.write(json.dumps(row) + "\n")
                plot_curves(log_rows, out / "curves.png")
                knn_str = f", k-NN top-1 {row['knn_top1']:.1f}%" if "knn_top1" in row else ""
                print(f"epoch {epoch}: loss {row['loss']:.4f}, h(P_t) {row['entropy']:.3f}, KL {row['kl']:.3f}"
                      f"{knn_str}, {row['img_per_s']:.0f} img/s")
                msg = collapse_message(row["entropy"], row["kl"], args.out_dim)
                if msg:
                    print(msg, file=sys.stderr)
        if not done or stop.requested:  # stopped by a signal
            if rank == 0:
                print(f"stopped at iteration {step}/{niter} of epoch {epoch}; saved {out / 'checkpoint.pth'}; "
                      f"the same command resumes", file=sys.stderr)
            return 0
        epoch, step = epoch + 1, 0
    return 0


def train_one_epoch(epoch, start_step, ctx, stop):
    """Iterations start_step.. of one epoch; returns the epoch's means, or None on a non-finite loss."""
    from tqdm import tqdm
    args, sched, device, niter, rank = ctx["args"], ctx["sched"], ctx["device"], ctx["niter"], ctx["rank"]
    sums = {k: torch.zeros((), device=device) for k in ("loss", "entropy", "kl")}
    never = torch.iinfo(torch.int64).max
    first_bad = torch.full((), never, device=device)  # the first iteration with a non-finite loss, if any
    n, t0 = 0, time.perf_counter()
    bar = tqdm(total=niter, initial=start_step, desc=f"epoch {epoch}", disable=rank != 0, leave=False,
               dynamic_ncols=True)
    for i, (crops, _) in enumerate(ctx["loader"], start=start_step):
        it = epoch * niter + i
        # stochastic depth draws seeded by the iteration: a resumed run makes the same ones
        torch.manual_seed(hash((args.seed, ctx["rank"], it)) % 2 ** 62)
        crops = [c.to(device, non_blocking=True) for c in crops]
        loss, diag = train_step(crops, it, epoch, ctx)
        # remember the first non-finite step without a host sync; it is checked at each log point
        first_bad = torch.where(torch.isfinite(loss), first_bad, first_bad.clamp(max=it))
        for k, v in (("loss", loss), ("entropy", diag["entropy"]), ("kl", diag["kl"])):
            sums[k] += v
        n += 1
        log_point = (i + 1) % args.log_freq == 0 or i + 1 == niter
        if log_point:
            if dist.is_initialized():  # every process stops at the same log point
                dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
            if first_bad.item() != never:
                break
            dt = time.perf_counter() - t0
            bar.set_postfix(loss=f"{sums['loss'].item() / n:.4f}", lr=f"{sched['lr'][it]:.2e}",
                            img_s=f"{n * args.batch_size_per_gpu * ctx['world'] / dt:.0f}")
            bar.update((i + 1) - bar.n)
        if stop.agreed(log_point, device):
            break
    bar.close()
    if first_bad.item() != never:  # checked here too: a Ctrl-C between log points must not save a broken model
        print(f"\nerror: the loss is not finite at iteration {int(first_bad.item())} (epoch {epoch}). Likely "
              f"causes: fp16 with small patches (use --precision bf16 or fp32), a too high --lr, or "
              f"--teacher_temp above 0.07. The last good checkpoint is {ctx['out'] / 'checkpoint.pth'} "
              f"(nothing was written after the failure).", file=sys.stderr)
        return None
    dt = time.perf_counter() - t0
    it = epoch * niter + i
    means = torch.stack([sums["loss"], sums["entropy"], sums["kl"]]) / n
    if dist.is_initialized():  # the epoch's numbers over all processes
        dist.all_reduce(means)
        means /= dist.get_world_size()
    row = dict(zip(("loss", "entropy", "kl"), means.tolist()))
    row.update(lr=float(sched["lr"][it]), wd=float(sched["wd"][it]), momentum=float(sched["momentum"][it]),
               steps=n, img_per_s=n * args.batch_size_per_gpu * ctx["world"] / dt)
    return row


def cli(argv=None):
    args = parse_args(argv)
    try:
        code = main(args)
    except (UsageError, data.DataError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(cli())
