"""The command line's edge, shared by train.py, 06_knn.py, 07_attention.py and 08_linear.py.

The contract: bad input ends with exactly one line starting `error:` on stderr, exit code 2, no traceback,
and nothing written. This module is where it is kept:
- argparse types that state their domain (`positive_int`, `probability`, ...), so that argparse itself
  rejects a value, naming the flag, the value and the allowed range;
- `Parser`, whose errors are that one line (argparse's own print a usage block first);
- `run`, the one place where the project's error classes become that line and exit code 2.
Rules across flags stay in each CLI's own checking function, which runs before anything is written.
"""
import argparse
import math
import os
import shutil
import sys
from pathlib import Path

import checkpoint
import images


class UsageError(Exception):
    """Bad command-line input that no single flag's type can see: the message names the problem and the fix."""


ERRORS = (UsageError, images.DataError, checkpoint.CheckpointError, checkpoint.WriteError)


def number(kind, ok, domain):
    """An argparse type: `kind(s)` when it satisfies `ok`, else an error that states the domain."""
    def parse(s):
        try:
            x = kind(s)
            valid = ok(x)  # nan fails every comparison, so it is refused too
        except ValueError:
            valid = False
        if not valid:
            raise argparse.ArgumentTypeError(f"expected {domain}, got {s!r}")
        return x
    parse.__name__ = domain
    return parse


positive_int = number(int, lambda x: x >= 1, "an integer >= 1")
nonneg_int = number(int, lambda x: x >= 0, "an integer >= 0")


def workers(s):
    return s if s == "auto" else number(int, lambda x: x >= 0, "'auto' or an integer >= 0")(s)


seed = number(int, lambda x: 0 <= x < 2 ** 63, "an integer in [0, 2^63)")  # torch.manual_seed's range
positive_float = number(float, lambda x: 0 < x < math.inf, "a finite number > 0")
nonneg_float = number(float, lambda x: 0 <= x < math.inf, "a finite number >= 0")
probability = number(float, lambda x: 0 <= x <= 1, "a number in [0, 1]")
fraction = number(float, lambda x: 0 < x <= 1, "a number in (0, 1]")
below_one = number(float, lambda x: 0 <= x < 1, "a number in [0, 1)")
cosine = number(float, lambda x: -1 <= x <= 1, "a cosine similarity in [-1, 1]")
MAX_PATCH = 64  # pixels per patch side: the patch embedding holds 3 x patch^2 weights per channel
patch_size = number(int, lambda x: 1 <= x <= MAX_PATCH, f"an integer in [1, {MAX_PATCH}]")
MAX_SIDE = 128  # patches per side of an image: beyond, the attention of one image needs gigabytes


def directory(s):
    """An output folder's path: an empty one would be the current directory, filled with a run's files unasked."""
    if not s.strip():
        raise argparse.ArgumentTypeError(f"expected a directory, got {s!r} (for the current directory, pass .)")
    return s


def bool_flag(s):
    if s.lower() in ("true", "1", "yes", "on"):
        return True
    if s.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


class OrderedPair(argparse.Action):
    """nargs=2 with low <= high, stored as a tuple (e.g. an area range of crops, with type=fraction)."""

    def __call__(self, parser, namespace, values, option_string=None):
        low, high = values
        if low > high:
            parser.error(f"argument {option_string}: expected LOW HIGH with LOW <= HIGH, got {low} {high}; swap them")
        setattr(namespace, self.dest, (low, high))


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors follow the contract: one `error:` line, exit code 2."""

    def error(self, message):
        sys.exit(error(message))


def error(e):
    """Print the contract's one line for an exception or a message; returns the exit code, 2. An exception raised
    in a DataLoader worker arrives as the same class with the worker's traceback as its message: its last line
    holds the original message."""
    message = str(e).strip()
    if "Original Traceback" in message:
        message = message.splitlines()[-1].split(": ", 1)[-1]
    print(f"error: {' '.join(message.splitlines())}", file=sys.stderr)
    return 2


def run(main, parse, argv=None):
    """parse(argv), then main(args): the exit code, with the project's errors ended as one `error:` line and 2."""
    try:
        args = parse(argv)
    except SystemExit as e:  # a bad flag (Parser.error has printed its line), or --help
        return e.code
    try:
        return main(args) or 0
    except ERRORS as e:
        return error(e)


PRETRAINED_HELP = (f"an official backbone file or full official checkpoint, or a released name "
                   f"({', '.join(checkpoint.RELEASED)}: downloaded once into torch.hub's cache; --arch and "
                   f"--patch_size follow from the name)")


def add_backbone_args(p, archs, patch=16, raw_pixels=True):
    """The evaluation scripts' source of features (06_knn.build_backbone reads it): a train.py checkpoint, an
    official file or released name, an untrained network, or (with raw_pixels) the pixels themselves."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint written by train.py (architecture read from it)")
    src.add_argument("--pretrained", help=PRETRAINED_HELP)
    src.add_argument("--random_init", action="store_true", help="an untrained network: the baseline to read against")
    if raw_pixels:
        src.add_argument("--raw_pixels", action="store_true",
                         help="the normalised pixels themselves: the other baseline")
    p.add_argument("--checkpoint_key", default="teacher", choices=["teacher", "student"],
                   help="the paper evaluates the teacher, which is better than the student throughout training")
    p.add_argument("--arch", default="vit_small", choices=sorted(archs), help="for --pretrained FILE / --random_init")
    p.add_argument("--patch_size", "--patch", type=patch_size, default=patch)


def source_name(args):
    """What the features come from, in words."""
    if args.random_init:
        return "random init"
    return "raw pixels" if getattr(args, "raw_pixels", False) else args.checkpoint or args.pretrained


def results_name(args, stem):
    """Where an evaluation's results go in its --output_dir: STEM.json, or STEM_random_init.json and
    STEM_raw_pixels.json for the baselines, so that they sit beside a checkpoint's own."""
    return f"{stem}_random_init.json" if args.random_init else f"{stem}_raw_pixels.json" if getattr(args, "raw_pixels", False) \
        else f"{stem}.json"


def output_dir_help(stem):
    return (f"where {stem}.json goes; default: beside --checkpoint, else the current directory "
            f"({stem}_random_init.json, {stem}_raw_pixels.json for the baselines)")


MIN_FREE = 1 << 20  # bytes: room for an evaluation's results; train.py checks for its checkpoint's size


def check_output_dir(path, flag="--output_dir"):
    """Before any work: an output folder that is a file, that cannot be created or written to, or on a full disk,
    is an error."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is an existing file; pass a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())  # the folder it would be created in
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {flag} {path} ({existing} is not a writable directory); "
                         f"choose a writable directory")
    if shutil.disk_usage(existing).free < MIN_FREE:  # found now, not after the work whose results it would hold
        raise UsageError(f"cannot write to {flag} {path}: the disk of {existing} is full; free some space or "
                         f"choose another directory")
