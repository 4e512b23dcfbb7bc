"""Where and how a run executes: the device, the process group, seeds, the output directory, and
stopping cleanly on Ctrl-C / SIGTERM. None of it is DINO; train.py calls it so that its own
code can stay the paper's."""
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cli import UsageError


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


def auto_precision(device):
    """bf16 autocast where the hardware multiplies bf16 natively: CUDA GPUs, and CPUs with AMX tile units
    (Intel Xeon since Sapphire Rapids), where a bf16 matrix product is much faster than fp32. Elsewhere bf16
    is emulated and slower: fp32."""
    if device.type == "cuda":
        return "bf16"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)  # private in PyTorch: absent means no
    return "bf16" if device.type == "cpu" and amx() else "fp32"


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)


def check_writable(out):
    """Create the output directory and write 1 MiB to it: fail now, not after an epoch of training."""
    probe = Path(out) / ".write_test"
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"0" * (1 << 20)), probe.unlink()
    except OSError as e:
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

