"""Saving and loading weights: atomic writes, `weights_only=True` reads, errors that name the fix; a training
run's checkpoints (what they hold, when they are written, and the checks before a run resumes from one).

Our checkpoints hold plain types only: state dicts, the centre, the epoch, `args` as a dict.
Also reads the official files: a released backbone (`dino_deitsmall16_pretrain.pth`, a bare
state dict) or a full official checkpoint ("teacher"/"student" entries whose keys carry
`module.` and `backbone.` prefixes, and `args`, an argparse.Namespace: the one class besides the
plain types that load_file lets weights_only rebuild, since it only holds attributes).
The released backbones can also be named (`dino_vits16`, ...): `load_released` fetches them from
the official URLs into torch.hub's cache, once.
"""
import argparse
import math
import os
import pickle
import tempfile
import time
import warnings
from pathlib import Path

import torch


class CheckpointError(Exception):
    """A weights file that cannot be used: the message names the problem and the fix."""


class WriteError(Exception):
    """A result that could not be written (a full disk): the message names the file and says what was kept."""


def write_atomic(path, write):
    """write(f) into a temporary file beside `path`, flushed to disk, then renamed: a crash at any moment leaves
    either the old complete file or the new complete file, never half of one. A failed write (a full disk) leaves
    the old file and no temporary one, and is a WriteError that says so."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        if not isinstance(e, (OSError, RuntimeError)):  # RuntimeError: torch.save's "unexpected pos" on a full disk
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or ["?"])[0][:200]
        kept = f"the {path.name} there is unchanged" if path.exists() else "nothing was written"
        raise WriteError(f"cannot write {path} ({reason}); {kept}; free some space (or choose another "
                         f"--output_dir) and run the same command again") from None


def save_atomic(obj, path):
    """torch.save, atomically (write_atomic)."""
    write_atomic(path, lambda f: torch.save(obj, f))


def load_file(path):
    """torch.load(weights_only=True) with one-line errors instead of tracebacks, whatever the bytes."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file in it (e.g. {path / 'checkpoint.pth'})")
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass the path of a .pth file")
    try:
        # argparse.Namespace: the official checkpoints' args; warnings: odd bytes make torch warn before it fails
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path} holds pickled Python objects, which torch.load(weights_only=True) refuses because "
                f"unpickling can run arbitrary code; if you trust it, re-save only its state dicts "
                f"(e.g. torch.save(torch.load(p, weights_only=False)['teacher'], 'teacher.pth'))") from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (it does not unpickle); pass a .pth file "
                              f"written by torch.save") from None
    except Exception as e:  # arbitrary bytes raise anything (EOFError, KeyError, RuntimeError, ...) on the way
        reason = (str(e).splitlines() or ["no message"])[0][:200]
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {reason}); "
                              f"pass a .pth file written by torch.save") from None


# The official released backbones (teacher backbone state dicts): name -> (arch, patch size, URL)
URL = "https://dl.fbaipublicfiles.com/dino/"
RELEASED = {
    "dino_vits16": ("vit_small", 16, URL + "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"),
    "dino_vits8": ("vit_small", 8, URL + "dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"),
    "dino_vitb16": ("vit_base", 16, URL + "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"),
    "dino_vitb8": ("vit_base", 8, URL + "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"),
}


def load_released(name, offline="or pass its path as --pretrained"):
    """The released backbone `name`, downloaded on first use into torch.hub's cache (with its progress bar).
    offline: the other way to the weights, in the words of the caller's interface."""
    url = RELEASED[name][2]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
    except OSError as e:  # URLError (offline) is an OSError
        raise CheckpointError(f"cannot download {url} ({getattr(e, 'reason', e)}); offline, fetch that file elsewhere "
                              f"and put it at {cached}, {offline}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{cached} is not a readable PyTorch checkpoint ({str(e).splitlines()[0][:200]}); "
                              f"delete it to download it again") from None


def strip_prefixes(state_dict, prefixes=("module.", "_orig_mod.")):
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def tensors(obj, what):
    """`obj` itself when it is a state dict (names to tensors), else an error naming what it is."""
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and torch.is_tensor(v)
                                                       for k, v in obj.items()):
        raise CheckpointError(f"{what} is not a state dict (names to tensors); is it a DINO checkpoint?")
    return obj


def backbone_state_dict(obj, key="teacher", what="the file"):
    """The backbone weights from any of: our checkpoint, an official checkpoint, a released backbone."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} holds a {type(obj).__name__}, not a state dict or a checkpoint dict")
    if key in obj and isinstance(obj[key], dict):
        obj = obj[key]
    elif any(k in obj for k in ("teacher", "student")):
        raise CheckpointError(f"{what} has no '{key}' entry (it has {sorted(map(str, obj))})")
    sd = strip_prefixes(tensors(obj, what))
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def load_strict(module, state_dict, what):
    """load_state_dict(strict=True), with the mismatched keys or shapes named in one line."""
    state_dict = tensors(state_dict, what)
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state_dict and state_dict[k].shape != own[k].shape]

    def show(keys):
        return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

    problems = ([f"missing keys: {show(missing)}"] if missing else []) + \
               ([f"unexpected keys: {show(unexpected)}"] if unexpected else []) + \
               ([f"shape mismatch (file vs model): {show(shapes)}"] if shapes else [])
    if problems:
        raise CheckpointError(f"{what} does not match the model ({'; '.join(problems)}); "
                              f"check --arch, --patch_size and --out_dim")
    module.load_state_dict(state_dict, strict=True)


def save_json(obj, path):
    """Small JSON results, written atomically like the checkpoints."""
    import json
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


# ---------------------------------------------------------------------------- a training run's checkpoints
def checkpoint_state(dino, config, epoch, step):
    """train.py's checkpoint of a train.DINO: plain types only, so that torch.load(weights_only=True) reads it;
    keys as the official checkpoint; config: the run's arguments as a dict."""
    student = getattr(dino.student, "module", dino.student)  # without DDP
    return {"student": student.state_dict(), "teacher": dino.teacher.state_dict(),
            "optimizer": dino.optimizer.state_dict(), "dino_loss": dino.loss_fn.state_dict(),
            "epoch": epoch, "step": step, "args": config, "scaler": dino.scaler.state_dict()}


def checkpoint_bytes(dino):
    """About the size of checkpoint_state(dino): the state dicts, and the optimizer's moments of the student's
    trainable parameters (AdamW keeps two, SGD one; none exist before the first step, so they are counted here)."""
    state = sum(t.numel() * t.element_size() for m in (dino.student, dino.teacher, dino.loss_fn)
                for t in m.state_dict().values())
    moments = 2 if isinstance(dino.optimizer, torch.optim.AdamW) else 1
    return state + moments * sum(p.numel() * p.element_size() for p in dino.student.parameters() if p.requires_grad)


SAVE_EVERY_S = 60  # epochs of a few seconds (small folders) are checkpointed about once a minute, not each time


class RunCheckpoints:
    """When a run writes its checkpoints: checkpoint.pth after an epoch, or, when epochs take seconds (writing
    the checkpoint and redrawing curves.png after each would take more time than the steps), after the first
    epoch to end SAVE_EVERY_S after the last one written; always after the last epoch and when stopped.
    checkpointNNNN.pth after every saveckp_freq-th epoch, numbered from 0 as the official ones."""

    def __init__(self, out, saveckp_freq):
        self.out, self.saveckp_freq, self.saved_at = Path(out), saveckp_freq, -math.inf

    def due(self, done, last):
        """Whether checkpoint.pth is to be written after an epoch, finished if `done`; `last`: the run's last epoch,
        or a stop."""
        return not done or last or time.monotonic() - self.saved_at >= SAVE_EVERY_S

    def save(self, state, epoch, done, due):
        if due:
            save_atomic(state, self.out / "checkpoint.pth")
            self.saved_at = time.monotonic()
        if done and self.saveckp_freq and epoch % self.saveckp_freq == 0:
            save_atomic(state, self.out / f"checkpoint{epoch:04d}.pth")  # 0000: after the first epoch


# what a checkpoint's network and optimizer state are made for: a resumed run must have the same
RESUME_FLAGS = ("arch", "patch_size", "global_size", "out_dim", "use_bn_in_head", "norm_last_layer", "optimizer")


def read_checkpoint(path, args, same_data=False):
    """A checkpoint_state from `path`, checked against this run's flags before anything is written: the same
    RESUME_FLAGS, and when it stopped mid-epoch the same batch size (its step counts batches of that size).
    With `same_data` (found in --output_dir, not named by --resume) also the same --data_path: a course run on
    another folder with the same preset must not quietly continue the last one."""
    state = load_file(path)
    if not isinstance(state, dict) or not {"student", "teacher", "optimizer", "dino_loss", "epoch"} <= set(state) \
            or not all(isinstance(state.get(k, 0), int) and state.get(k, 0) >= 0 for k in ("epoch", "step")):
        raise CheckpointError(f"{path} is not a train.py checkpoint (needs student, teacher, optimizer, "
                              f"dino_loss, epoch); 06_knn.py and 07_attention.py take backbone files")
    saved = state.get("args")
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved if isinstance(saved, dict) else {}
    for name in RESUME_FLAGS + (("batch_size_per_gpu",) if state.get("step") else ()):
        if name in saved and saved[name] != getattr(args, name):
            why = " and stopped mid-epoch" if name == "batch_size_per_gpu" else ""
            raise CheckpointError(f"{path} was trained with --{name} {saved[name]}{why}, this run has "
                                  f"{getattr(args, name)}; resume with the same flags, or start afresh with "
                                  f"--resume none or a new --output_dir")
    where = lambda d: os.path.realpath(d) if os.path.isdir(d) else d  # a folder, or a built-in dataset's name
    if same_data and "data_path" in saved and where(saved["data_path"]) != where(args.data_path):
        raise CheckpointError(f"{path} was trained on --data_path {saved['data_path']}, this run reads "
                              f"{args.data_path}; give this run its own --output_dir (or, to continue that run on "
                              f"this data, --resume {path})")
    return state


def load_checkpoint(state, path, dino, niter):
    """Restore a checkpoint_state into a train.DINO; returns its (epoch, step). Any key mismatch is an error, and
    so is a stop mid-epoch at an iteration this run's epochs of `niter` iterations do not reach."""
    load_strict(dino.student, state["student"], f"{path} (student)")
    load_strict(dino.teacher, state["teacher"], f"{path} (teacher)")
    load_strict(dino.loss_fn, state["dino_loss"], f"{path} (dino_loss)")
    dino.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        dino.scaler.load_state_dict(state["scaler"])
    if state.get("step", 0) >= niter:  # stopped mid-epoch, with epochs of another length (--steps or the data)
        raise CheckpointError(f"{path} stopped at iteration {state['step']} of an epoch, and this run's epochs have "
                              f"{niter}; resume with the flags it was made with, or start afresh with --resume "
                              f"none or a new --output_dir")
    return state["epoch"], state.get("step", 0)
