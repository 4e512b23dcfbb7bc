"""Where and how a run executes: the device, the process group, seeds, the output directory, and
stopping cleanly on Ctrl-C / SIGTERM. None of it is DINO; train.py calls it so that its own
code can stay the paper's."""
import contextlib
import os
import shutil
import signal
import sys
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

