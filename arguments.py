"""train.py's arguments: every flag with its official default and why it is what it is, the presets (named
sets of defaults), and the rules across flags, checked before anything is written.
"""
import argparse
import importlib
import os
from pathlib import Path

import checkpoint as ckpt
import cli as cmdline
import data
from cli import UsageError

vits = importlib.import_module("02_vit")


# A small recipe for a 2-core CPU; explicit flags still override it. The measurements behind each choice are in
# docs/experiments.md.
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
        "eval_every": 3,  # halfway and at the end
        "saveckp_freq": 0,
        "output_dir": "runs/cpu_course",
    },
}
# The course run of Sec. 4.2.2 on the embedded scenes (scenes.py): the course recipe with 8 x 8 patches per image,
# so that a mask of the attention has a shape to compare with the object's.
PRESETS["scenes_course"] = dict(
    PRESETS["cpu_course"], data_path="scenes",
    global_size=64, local_size=32,  # 64 px scenes: 8 x 8 patches of 8 px, local crops of 4 x 4
    batch_size_per_gpu=32,  # a step four times dearer than the textures' at 64: half the batch, more steps
    steps=480, eval_every=1, saveckp_freq=1,  # a k-NN point and a checkpoint each sixth: the curves of emergence
    output_dir="runs/scenes_course")



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
                   help="auto: bf16 where the device multiplies it natively (GPUs from compute capability 8.0, CPUs with AMX "
                        "or AVX-512 BF16), fp16 on older GPUs, fp32 elsewhere; fp16 adds a GradScaler")
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
    crops = dict(type=cmdline.fraction, nargs=2, action=cmdline.OrderedPair)
    g.add_argument("--global_crops_scale", **crops, default=(0.4, 1.0),
                   help="area range of the 2 global crops; (0.14, 1) when there are no local crops")
    g.add_argument("--local_crops_number", type=cmdline.nonneg_int, default=8, help="0 disables multi-crop")
    g.add_argument("--local_crops_scale", **crops, default=(0.05, 0.4),
                   help="area range of the local crops: small parts of the image")
    g.add_argument("--global_size", type=cmdline.positive_int, default=224, help="side of the global crops in pixels")
    g.add_argument("--local_size", type=cmdline.positive_int, default=96, help="side of the local crops in pixels")
    g = p.add_argument_group("data, output, runtime")
    g.add_argument("--data_path", default="textures",
                   help=f"an ImageFolder directory (its train/ when present) or one of {', '.join(data.BUILTIN)}")
    g.add_argument("--output_dir", type=cmdline.directory, default="runs/dino", help="checkpoints, log.txt, curves.png")
    g.add_argument("--saveckp_freq", type=cmdline.nonneg_int, default=20,
                   help="also keep checkpointNNNN.pth after epochs 0, N, 2N, ... (NNNN counts from 0, as official)")
    g.add_argument("--resume", default="auto",
                   help="'auto': continue from output_dir/checkpoint.pth if it exists; a path; or 'none'")
    g.add_argument("--eval_every", type=cmdline.nonneg_int, default=0, help="k-NN evaluation every N epochs (0: never)")
    g.add_argument("--seed", type=cmdline.seed, default=0, help="initial weights, data order and crops all follow it")
    g.add_argument("--num_workers", type=cmdline.workers, default="auto",
                   help="data-loading processes per GPU; auto: 10 (as official) on a GPU, and on a CPU-only run the "
                        "number that paces the step best, from a batch of crops and a step timed at start")
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
    # one found in --output_dir, not named by --resume, must be of the same data (a --data_path that is neither a
    # folder nor a built-in name is refused later, naming it)
    same_data = args.resume == "auto" and (os.path.isdir(args.data_path) or args.data_path in data.BUILTIN)
    return path, ckpt.read_checkpoint(path, args, same_data)
