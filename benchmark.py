"""`train.py --benchmark N` / `--benchmark_data N`: time the real training step.

Everything is built exactly as for training (models, compile, precision, optimizer, schedules);
then warm-up steps (compilation happens there) and N timed steps, on synthetic multi-crop
batches or, with --benchmark_data, on the real data loader so that its share is visible.
With synthetic batches the batched photometric augmentation (colour jitter, grayscale, blur,
solarization, normalisation of 8-bit crops) is timed too, as a share of the step. With the real
loader, the CPU time its workers spent per image is measured (time.process_time in each worker).

Model FLOPs are counted analytically (a multiply-add is 2 FLOPs), forward = 1 unit, backward = 2:
    student forward + backward on all crops (3x) + teacher forward on the 2 global crops (1x)
    per block and crop of N tokens: 24 N D^2 (qkv, proj, MLP) + 4 N^2 D (q k^T and attn v)
MFU = achieved model FLOP/s over the device's dense peak, where the peak is known.
"""
import resource
import time

import torch
from torch.utils.data import default_collate

PEAK_TFLOPS_16BIT = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "V100": 125.0}


def vit_forward_flops(backbone, head, n_images, size):
    """FLOPs of backbone + head forward on n_images crops of size x size."""
    p = backbone.patch_embed.patch_size
    D, L = backbone.embed_dim, len(backbone.blocks)
    npatch = (size // p) ** 2
    N = npatch + 1
    patch = 2 * npatch * (3 * p * p) * D
    blocks = L * (24 * N * D * D + 4 * N * N * D)
    mlp_dims = [m.weight.shape for m in head.mlp if isinstance(m, torch.nn.Linear)]
    head_flops = sum(2 * o * i for o, i in mlp_dims) + 2 * head.last_layer.weight_v.numel()
    return n_images * (patch + blocks + head_flops)


def step_flops(student, B, global_size, local_size, n_local):
    fwd_student = (vit_forward_flops(student.backbone, student.head, 2 * B, global_size)
                   + vit_forward_flops(student.backbone, student.head, n_local * B, local_size))
    fwd_teacher = vit_forward_flops(student.backbone, student.head, 2 * B, global_size)
    return 3 * fwd_student + fwd_teacher


def peak_tflops(device, precision):
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS_16BIT.items() if k in name), None)


def measure(train_step, dino, run):
    """Time train_step(dino, crops, it, epoch), the step train.py trains with, on `run`'s settings."""
    args, device = run.args, run.device
    B, n_steps = args.batch_size_per_gpu, args.benchmark or args.benchmark_data
    ncrops = 2 + args.local_crops_number
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    epoch = run.budget.freeze_last_layer  # past the frozen epochs, so the timed step updates every parameter
    if args.benchmark:
        g = torch.Generator().manual_seed(0)
        synthetic = [torch.randn(B, 3, args.global_size, args.global_size, generator=g) for _ in range(2)] + \
                    [torch.randn(B, 3, args.local_size, args.local_size, generator=g) for _ in range(ncrops - 2)]
        synthetic = [c.to(device) for c in synthetic]
        batches = iter(lambda: synthetic, None)
    else:
        def from_loader():
            while True:
                for crops, _ in run.loader:  # finished crops, on the device
                    yield crops
        batches = from_loader()
    warmup, total = 3, len(dino.schedule.lr)  # iterations past the schedule's end reuse it from the start
    for i in range(warmup):  # compile, cudnn autotuning, allocator warm-up
        loss, _ = train_step(dino, next(batches), i % total, epoch)
    loss.item()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wait, t0 = 0.0, time.perf_counter()
    for i in range(n_steps):
        tw = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - tw
        loss, _ = train_step(dino, batch, (warmup + i) % total, epoch)
    loss.item()  # one sync at the end: the timed loop is what training does between log points
    sync()
    dt = time.perf_counter() - t0
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:  # peak resident memory of the process
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = getattr(dino.student, "module", dino.student)  # without DDP
    flops = step_flops(model, B, args.global_size, args.local_size, ncrops - 2)
    tflops = flops * n_steps / dt / 1e12
    line = (f"benchmark: {B * n_steps / dt:.1f} img/s, {1000 * dt / n_steps:.1f} ms/step, peak memory {mem:.0f} MiB, "
            f"{tflops:.3g} TFLOP/s model FLOPs")
    peak = peak_tflops(device, run.precision)
    if peak:
        line += f", MFU {100 * tflops / peak:.1f}% of {peak:.0f} TFLOP/s"
    if run.rank == 0:
        print(f"{args.arch}/{args.patch_size}, batch {B}, 2x{args.global_size} + {ncrops - 2}x{args.local_size} crops, "
              f"K={args.out_dim}, {run.precision}, compile={'on' if run.compiled else 'off'}, "
              f"{'reference mode' if args.reference_mode else 'fast path'}, {device}")
        if args.benchmark_data:
            print(f"data loading: {100 * wait / dt:.1f}% of step time (waiting for the next batch)")
            print(input_pipeline_line(run.loader))
        if args.benchmark and run.loader.augment is not None:
            ms = 1000 * time_photometric(run.loader.augment, B, args, device, sync, n_steps)
            print(f"photometric augmentation (batched, on {device}): {ms:.1f} ms/step, "
                  f"{100 * ms / (1000 * dt / n_steps):.1f}% of the step")
        print(line)
    return 0


def input_pipeline_line(loader):
    """CPU per image in the data-loading workers, measured there; the batched photometric half counts
    too when it ran in the workers (a CPU-only run: on an accelerator it runs on the device)."""
    per_image, batched = 1000 * loader.cpu_seconds / loader.images, 1000 * loader.cpu_seconds_batched / loader.images
    line = (f"input pipeline: {per_image + batched:.2f} ms of CPU per image, "
            f"{1000 / (per_image + batched):.0f} img/s per worker core")
    if batched:
        line += (f" (per image: decode, crops, flips {per_image:.2f} ms; batched photometric half, in the workers "
                 f"on a CPU-only run: {batched:.2f} ms)")
    return line


def time_photometric(augment, B, args, device, sync, n):
    """Seconds per batch of the photometric half on B synthetic images of uint8 crops (draws as in training)."""
    g = torch.Generator().manual_seed(0)
    sizes = [args.global_size] * 2 + [args.local_size] * args.local_crops_number
    crops = [torch.randint(0, 256, (B, 3, s, s), dtype=torch.uint8, generator=g).to(device) for s in sizes]
    params = default_collate([augment.sample(g) for _ in range(B)])
    augment(crops, params)  # warm-up
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        augment(crops, params)
    sync()
    return (time.perf_counter() - t0) / n
