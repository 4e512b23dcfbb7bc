"""Saving and loading weights: atomic writes, `weights_only=True` reads, errors that name the fix.

Our checkpoints hold plain types only: state dicts, the centre, the epoch, `args` as a dict.
Also reads the official files: a released backbone (`dino_deitsmall16_pretrain.pth`, a bare
state dict) or a full official checkpoint ("teacher"/"student" entries whose keys carry
`module.` and `backbone.` prefixes, and `args`, an argparse.Namespace: the one class besides the
plain types that load_file lets weights_only rebuild, since it only holds attributes).
The released backbones can also be named (`dino_vits16`, ...): `load_released` fetches them from
the official URLs into torch.hub's cache, once.
"""
import argparse
import os
import pickle
import tempfile
import warnings
from pathlib import Path

import torch


class CheckpointError(Exception):
    """A weights file that cannot be used: the message names the problem and the fix."""


def save_atomic(obj, path):
    """Write to a temporary file beside `path`, flush it to disk, then rename: a crash at any
    moment leaves either the old complete file or the new complete file, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_file(path):
    """torch.load(weights_only=True) with one-line errors instead of tracebacks, whatever the bytes."""
    path = Path(path)
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


def load_released(name):
    """The released backbone `name`, downloaded on first use into torch.hub's cache (with its progress bar)."""
    url = RELEASED[name][2]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
    except OSError as e:  # URLError (offline) is an OSError
        raise CheckpointError(f"cannot download {url} ({getattr(e, 'reason', e)}); offline, fetch that file elsewhere "
                              f"and put it at {cached}, or pass its path as --pretrained") from None
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
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
