"""The supervised baseline the paper compares with (Sec. 4.2.2, Fig. 4; Table 2's "Supervised" rows): the same
ViT trained with the labels instead of DINO, on the same views, for the same steps.

    loss = mean over crops v in [g1, g2, l1..lN] of CE( W f(x_v), y )      f: the backbone's CLS, W: a linear layer

Everything else is train.py's: the flags and presets (so `--preset scenes_course` gives the same network, crops,
batch, steps, optimizer, lr and weight-decay schedules, clipping and precision), the data loader, the seeds.
What differs is only what is learned from: a label per image, where DINO has only the image. The result is a
backbone checkpoint that 06_knn.py, 08_linear.py, 07_attention.py and 10_segmentation.py read with --checkpoint.

The paper's supervised models are DeiT ImageNet classifiers (stronger augmentation, longer training); this is
the comparison made with everything else held fixed, which is what a small folder allows.

Usage:
    python supervised.py --preset scenes_course        # writes runs/scenes_supervised/checkpoint.pth
    python supervised.py --data_path DIR --preset cpu_course
"""
import contextlib
import importlib
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint as ckpt
import cli
import data
import runtime
import train
import arguments
from cli import UsageError

vits = importlib.import_module("02_vit")
heads = importlib.import_module("03_head")
ema = importlib.import_module("05_teacher_ema")
knn = importlib.import_module("06_knn")


def supervised_step(model, optimizer, crops, targets, lr, wd, clip_grad, autocast):
    """One step: cross-entropy of every crop against its image's label; the same clipping as DINO's step."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if i == 0:
            group["weight_decay"] = wd
    with autocast:
        logits = model(crops)  # (V B, classes): every crop, global and local
        loss = F.cross_entropy(logits.float(), targets.repeat(len(crops)))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad:
        train.clip_gradients(model, clip_grad)
    optimizer.step()
    return loss.detach()


def main(args):
    out = Path(args.output_dir.rstrip("/") + "_supervised")
    cli.check_output_dir(out)
    runtime.seed_everything(args.seed)
    device = runtime.pick_device(0)
    precision = args.precision if args.precision != "auto" else runtime.auto_precision(device)[0]
    dtype = train.autocast_dtype(precision)
    dataset, augment, _ = train.build_data(args)  # train.py's crops and seeds
    if len(dataset.classes) < 2:
        raise UsageError(f"{args.data_path} has {len(dataset.classes)} class; the supervised baseline needs labels: "
                         f"class folders under train/")
    workers = args.num_workers if args.num_workers != "auto" else 0 if device.type == "cpu" else 10
    loader = train.training_loader(dataset, args.batch_size_per_gpu, workers, args.seed, 0, 1, device, augment)
    budget = train.fit_to_budget(args, len(loader))
    niter = budget.niter

    backbone = vits.ARCHS[args.arch](patch_size=args.patch_size, img_size=args.global_size,
                                     drop_path_rate=args.drop_path_rate)
    model = heads.MultiCropWrapper(backbone, nn.Linear(backbone.embed_dim, len(dataset.classes))).to(device)
    optimizer = torch.optim.AdamW(train.params_groups(model))
    lr = ema.cosine_scheduler(args.lr * args.batch_size_per_gpu / 256, args.min_lr, budget.epochs, niter,
                              budget.warmup_epochs)
    wd = ema.cosine_scheduler(args.weight_decay, args.weight_decay_end, budget.epochs, niter)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    runtime.check_writable(out)
    print(f"supervised baseline: {args.arch}/{args.patch_size} on {args.data_path} ({len(dataset.classes)} classes), "
          f"{budget.epochs} epochs of {niter} steps, precision {precision}")
    from tqdm import tqdm
    bar = tqdm(total=budget.epochs * niter, dynamic_ncols=True)
    for epoch in range(budget.epochs):
        loader.sampler.set_epoch(epoch)
        model.train()
        for i, (crops, targets) in zip(range(niter), loader):
            it = epoch * niter + i
            loss = supervised_step(model, optimizer, crops, targets.to(device), float(lr[it]), float(wd[it]),
                                   args.clip_grad, autocast)
            if (i + 1) % args.log_freq == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    bar.close()
    top1 = None
    if data.has_val(args.data_path):
        top1, _ = knn.evaluate(backbone, args.data_path, args.global_size, device, (20,), num_workers=workers,
                               dtype=dtype)[20]
    # the evaluation scripts read a train.py checkpoint's "teacher" and "args": the trained backbone goes there
    ckpt.save_atomic({"teacher": backbone.state_dict(), "args": dict(budget.config(args), supervised=True),
                      "classifier": model.head.state_dict(), "knn_top1": top1}, out / "checkpoint.pth")
    print(f"saved {out / 'checkpoint.pth'}" + (f"; k-NN top-1 (k=20): {top1:.2f}%" if top1 is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, arguments.parse_args))
