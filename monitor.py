"""What a training run tells its user: a line of log.txt and of the console per epoch, the teacher's entropy
and KL in plain words (the two collapses of paper Sec. 5.3), and curves.png, redrawn from log.txt's rows with
every checkpoint."""
import json
import math
import os
import sys
from pathlib import Path

import checkpoint


def log_epoch(row, log_rows, out, draw=True):
    """A line of out/log.txt, curves.png redrawn (if `draw`), a line on the console, and plain words if it
    collapses. log_rows: the run's rows so far, `row` appended."""
    log_rows.append(row)
    write_log(log_rows, Path(out) / "log.txt")
    if draw:
        plot_curves(log_rows, Path(out) / "curves.png")
    knn_str = f", k-NN top-1 {row['knn_top1']:.1f}%" if "knn_top1" in row else ""
    print(f"epoch {row['epoch']}: loss {row['loss']:.4f}, h(P_t) {row['entropy']:.3f}, KL {row['kl']:.3f}, "
          f"h(batch mean) {row['batch_entropy']:.2f}"
          f"{knn_str}, {row['img_per_s']:.0f} img/s")
    K = row["out_dim"]
    msg = collapse_message(row["entropy"], row["kl"], K)
    if not msg and not drift_message(log_rows[:-1], K):  # a drift is named once, when it starts
        msg = drift_message(log_rows, K)
    msg = msg or stalled_message(row)
    if msg:
        print(msg, file=sys.stderr)


def write_log(rows, path):
    """log.txt, one JSON line per row, rewritten whole and atomically: never a row cut short."""
    checkpoint.write_atomic(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


def read_log(path, epochs, rewrite=True):
    """The rows of log.txt (at `path`) of the first `epochs` epochs, those a resumed run keeps; with `rewrite`,
    the file is cut to them: epochs logged after the checkpoint are trained and logged again. A line that is not a
    row (cut short by a kill or a full disk while an append wrote it) is dropped, with a note."""
    path = Path(path)
    rows, bad = [], []
    for i, line in enumerate(path.read_text().splitlines() if path.exists() else [], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            rows.append(row)
        else:
            bad.append(i)
    if bad:
        print(f"note: dropped line {', '.join(map(str, bad))} of {path}: not a whole row (cut short by a kill or a "
              f"full disk while it was written)", file=sys.stderr)
    kept = [r for r in rows if r["epoch"] < epochs]
    if (bad or len(kept) < len(rows)) and rewrite:
        write_log(kept, path)
    return kept


def write_config(config, out):
    """config.json, this start's configuration. When it differs from the last start's (a resume with other flags),
    that one is kept as config_1.json, config_2.json, ... (every configuration of the run, in order) and the
    changed flags are named."""
    path = Path(out) / "config.json"
    now = json.loads(json.dumps(config))  # as JSON reads it back: tuples become lists
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or not readable
        before = now
    if before != now:
        n = 1
        while (kept := path.with_name(f"config_{n}.json")).exists():
            n += 1
        os.replace(path, kept)
        changed = [f"--{k} {before.get(k)} -> {v}" for k, v in now.items() if before.get(k) != v]
        print(f"note: flags changed since the last start: {', '.join(changed)}; that start's configuration is kept "
              f"in {kept}", file=sys.stderr)
    checkpoint.save_json(config, path)


def non_finite_message(it, epoch, last_checkpoint):
    return (f"error: the loss is not finite at iteration {it} (epoch {epoch}). Likely causes: fp16 with small patches "
            f"(use --precision bf16 or fp32), a too high --lr, or --teacher_temp above 0.07. " +
            (f"The last good checkpoint is {last_checkpoint} (nothing was written after the failure)."
             if last_checkpoint.exists() else "Nothing was written: the run had not saved a checkpoint yet."))


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


def drift_message(log_rows, K, window=3):
    """An early warning, while there is still time to stop and change a flag: KL has shrunk epoch after epoch for
    `window` epochs, by more than a tenth in all (a long healthy run's KL eases down by a few percent), while the
    teacher's entropy is near one of the collapse ends and not coming back: above 80 % of log K; or below 10 % of
    log K with KL there too and with the batch's mean P_t on few dimensions (h below 10 % of log K too), since a
    sharp teacher whose images each take a dimension of their own is what sharpening is for."""
    if len(log_rows) < window:
        return None
    h = [r["entropy"] for r in log_rows[-window:]]
    kl = [r["kl"] for r in log_rows[-window:]]
    if not all(b < a for a, b in zip(kl, kl[1:])) or kl[-1] > 0.9 * kl[0]:
        return None  # the student still finds something to learn
    log_k = math.log(K)
    if h[-1] > 0.8 * log_k and h[-1] >= h[0]:
        return (f"warning: drifting towards the uniform collapse: h(P_t) = {h[-1]:.2f} is {h[-1] / log_k:.0%} of "
                f"log K and KL fell from {kl[0]:.2f} to {kl[-1]:.2f} over {window} epochs. Centering is winning: "
                f"lower --teacher_temp, or use a smaller --out_dim (about one prototype per 20 images); a run with more "
                f"--steps may also turn back on its own, so watch whether KL keeps falling.")
    one_dim = log_rows[-1].get("batch_entropy", 0.0) < 0.1 * log_k  # every image on the same few dimensions
    if h[-1] < 0.1 * log_k and kl[-1] < 0.1 * log_k and h[-1] <= h[0] and one_dim:
        return (f"warning: drifting towards one dimension: h(P_t) = {h[-1]:.2f} is {h[-1] / log_k:.0%} of log K and "
                f"KL fell from {kl[0]:.2f} to {kl[-1]:.2f} over {window} epochs, with every image on the same few "
                f"dimensions. Sharpening is winning: stop and raise --teacher_temp slightly or lower --lr.")
    return None


def stalled_message(row):
    """A run that does not collapse and still learns nothing: its k-NN has not cut a tenth of the errors of the
    same network before training."""
    if row.get("knn_init") is None or 100 - row["knn_top1"] < 0.9 * (100 - row["knn_init"]):
        return None
    return (f"warning: k-NN top-1 {row['knn_top1']:.1f}% is hardly better than the same network before training "
            f"({row['knn_init']:.1f}%): the features have not learned what tells these classes apart. Compare raw "
            f"pixels (06_knn.py --raw_pixels) and labels on the same views (supervised.py); on images whose class is "
            f"the shape of a thin outline or a letter this preset learns nothing: docs/own-images.md#shapes")


def plot_curves(log_rows, path):
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is
    keys = [("loss", "loss = h + KL"), ("entropy", "teacher entropy h(P_t)"), ("kl", "KL(P_t || P_s)"),
            ("knn_top1", "k-NN top-1 (%)"), ("lr", "learning rate"), ("momentum", "teacher momentum")]
    fig = Figure(figsize=(12, 6))
    axes = fig.subplots(2, 3)
    epochs = [r["epoch"] for r in log_rows]
    for ax, (k, title) in zip(axes.flat, keys):
        pts = [(r["epoch"], r[k]) for r in log_rows if r.get(k) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3)
        if k == "entropy" and log_rows:
            pts = [(r["epoch"], r["batch_entropy"]) for r in log_rows if "batch_entropy" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label="h(batch mean of P_t)")
            ax.axhline(math.log(log_rows[-1]["out_dim"]), color="gray", ls="--", label="log K")
            ax.axhline(0, color="gray", ls=":")
            ax.legend()
        ax.set_title(title), ax.set_xlabel("epoch")
        ax.set_xlim(min(epochs, default=0) - 0.5, max(epochs, default=0) + 0.5)
    fig.tight_layout()
    checkpoint.write_atomic(path, lambda f: fig.savefig(f, dpi=80, format="png"))
