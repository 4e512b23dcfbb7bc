"""Where and how a run executes: the device, the process group, seeds, the output directory, and
stopping cleanly on Ctrl-C / SIGTERM. None of it is DINO; train.py calls it so that its own
code can stay the paper's."""
import contextlib
import os
import platform
import shutil
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cli import UsageError


PEERS_WAIT_S = 60  # how long the first process waits for the others to join; torchrun starts them together
LAUNCH = ("launch it with torchrun (e.g. torchrun --nproc_per_node=2 train.py ...), or for one process unset "
          "WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT")


def init_distributed():
    """(rank, world_size, local_rank); a process group only under torchrun (or its variables) with more than one
    process. Variables left over from another launch (a shell that ran torchrun, a SLURM script) would make a
    lone process wait for peers that never come: the wait is bounded and the error says what to do."""
    env = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    try:
        world = int(env["WORLD_SIZE"] or 1)
    except ValueError:
        raise UsageError(f"WORLD_SIZE={env['WORLD_SIZE']} is not a number of processes; {LAUNCH}") from None
    if world > 1 and not dist.is_initialized():
        missing = [k for k, v in env.items() if not v]
        if missing:
            raise UsageError(f"WORLD_SIZE={world} is set but not {', '.join(missing)}: this is not a torchrun launch; "
                             f"{LAUNCH}")
        try:
            with stderr_to_devnull():  # c10d logs each failed try to connect there, with C++ stack frames
                store, rank, world = next(dist.rendezvous("env://", timeout=timedelta(seconds=PEERS_WAIT_S)))
        except (RuntimeError, ValueError) as e:  # DistStoreError, DistNetworkError: RuntimeErrors
            raise UsageError(f"the {world} processes of WORLD_SIZE={world} (RANK={env['RANK']}, MASTER_ADDR="
                             f"{env['MASTER_ADDR']}, MASTER_PORT={env['MASTER_PORT']}) did not all join within "
                             f"{PEERS_WAIT_S} s ({str(e).splitlines()[0][:120]}); {LAUNCH}") from None
        store.set_timeout(dist.constants.default_pg_timeout)  # all here: later waits are the training's own
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=store, rank=rank,
                                world_size=world)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


@contextlib.contextmanager
def stderr_to_devnull():
    """Output to file descriptor 2, also from C++ code, discarded."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def pick_device(local_rank):
    # tiny values (e.g. Adam's second moments of near-zero gradients) are slow to compute with on CPUs
    torch.set_flush_denormal(True)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def auto_precision(device, capability=None, cpu_bf16=None):
    """(precision, reason) for --precision auto: the fastest precision that trains safely on the device.
    - CUDA: bf16 from compute capability 8.0 on (A100, RTX 30xx and later, H100), whose tensor cores multiply it
      natively; below that (T4, V100) fp16 with loss scaling, the precision their tensor cores have.
    - Apple GPUs (MPS): fp32, the precision every operation supports there.
    - CPU: bf16 where the cores multiply bf16 natively (AMX tiles or AVX-512 BF16 instructions), fp32 where they
      would emulate it (slower than fp32). Where PyTorch cannot read the CPU's features, a matrix product in
      both precisions decides (about 0.1 s).
    capability, cpu_bf16: the device's properties ((major, minor); the CPU's bf16 units by name, [] for none),
    read from the device when not given (the tests give them)."""
    if device.type == "cuda":
        major, minor = capability or torch.cuda.get_device_capability(device)
        if major >= 8:
            return "bf16", f"compute capability {major}.{minor} multiplies bf16 natively"
        return "fp16", f"compute capability {major}.{minor} has fp16 but no bf16 tensor cores: fp16 with loss scaling"
    if device.type != "cpu":
        return "fp32", f"{device.type}: fp32 (autocast there is not measured; try --precision fp16)"
    units = cpu_bf16_units() if cpu_bf16 is None else cpu_bf16
    if units is None:
        speedup = bf16_speedup()
        return ("bf16" if speedup > 1.3 else "fp32"), f"a bf16 matrix product runs {speedup:.1f}x as fast as fp32 here"
    if units:
        return "bf16", f"this CPU multiplies bf16 natively ({' and '.join(units)})"
    return "fp32", "this CPU has no bf16 units (no AMX, no AVX-512 BF16): bf16 would be emulated, slower than fp32"


def autocast_dtype(precision):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def notebook_device(**properties):
    """(device, precision, reason) for a notebook: the GPU when there is one, and the precision train.py's
    --precision auto would choose there, said in one line. properties: auto_precision's (the tests give them)."""
    device = pick_device(0)
    precision, reason = auto_precision(device, **properties)
    print(f"device {device}, precision {precision}: {reason}")
    return device, precision, reason


def inference_dtype(device):
    """The evaluation scripts' autocast dtype (None: fp32), by auto_precision's rule, stated."""
    precision, why = auto_precision(device)
    print(f"precision {precision}: {why}")
    return autocast_dtype(precision)


def cpu_bf16_units():
    """The x86 CPU's native bf16 units by name ([] if none), or None where PyTorch cannot tell (other CPUs)."""
    cpu = torch.cpu
    if platform.machine().lower() not in ("x86_64", "amd64") or not hasattr(cpu, "_is_avx512_bf16_supported"):
        return None
    return [name for name, has in (("AMX", getattr(cpu, "_is_amx_tile_supported", lambda: False)()),
                                   ("AVX-512 BF16", cpu._is_avx512_bf16_supported())) if has]


def bf16_speedup(n=512, reps=8):
    """fp32 time / bf16 time of an n x n matrix product on this CPU."""
    seconds = []
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n).to(dtype)
        a @ a  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ a
        seconds.append(time.perf_counter() - t0)
    return seconds[0] / seconds[1]


def choose_workers(crops_s, step_s, threads, cores):
    """Loader processes for a CPU-only run, from two measurements: seconds to make one batch of crops in one
    process, and seconds of one training step on `threads` threads. With none, the training process makes each
    batch, then steps (step + crops); w workers make batches beside a step that keeps min(threads, cores - w)
    threads, and the slower of the two sets the pace."""
    def pace(w):
        return step_s + crops_s if w == 0 else max(step_s * threads / min(threads, cores - w), crops_s / w)
    return min(range(cores), key=pace)


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)


def check_writable(out, checkpoint_bytes=0):
    """Check that a checkpoint fits beside the last one (it is written whole before it replaces it), then create
    the output directory and write 1 MiB to it: fail now, not after an epoch of training."""
    free = shutil.disk_usage(next(p for p in (Path(out), *Path(out).absolute().parents) if p.exists())).free
    if free < checkpoint_bytes:
        raise UsageError(f"--output_dir {out} has {free / 2 ** 20:.0f} MiB free, and a checkpoint of this run needs "
                         f"{checkpoint_bytes / 2 ** 20:.0f} MiB; free some space or choose another directory")
    probe = Path(out) / ".write_test"
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"0" * (1 << 20)), probe.unlink()
    except OSError as e:
        probe.unlink(missing_ok=True)
        raise UsageError(f"cannot write to --output_dir {out} ({e.strerror or e}); choose a writable directory "
                         f"with free space") from None


# Ctrl-C reaches every process of the terminal, and SIGTERM / SIGUSR1 every process of the group (SLURM's scancel,
# preemption and --signal ahead of a time limit; systemd; timeout). The main process finishes its step and saves.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


def ignore_stop_signals(_):
    """In each loader worker: leave the stop signals to the main process (a worker killed by one would end the
    run without its checkpoint)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class Stop:
    """Ctrl-C / SIGTERM / SIGUSR1: finish the current step, checkpoint, exit cleanly."""

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

