"""Video object segmentation by label propagation (paper Sec. 4.2.2 and Table 5, DAVIS-2017; official
eval_video_segmentation.py, scored as the DAVIS-2017 semi-supervised toolkit scores).

The first frame's ground-truth mask is carried through the video by nearest neighbours between frozen
patch features: nothing is trained or fine-tuned, the features alone decide which patch follows which.

    f_t^i    = l2norm( patch token i of the last block on frame t )       get_intermediate_layers(x, n=1)[0][:, 1:]
    context  = frame 0 with its ground-truth one-hot mask y_0, and the m previous frames t-m .. t-1 with
               their predicted soft masks y_s                              m = n_last_frames
    A_t(i,j) = exp(<f_t^i, f_s^j> / T)    for j in the context within r patches of i (|row - row'| <= r and
                                          |col - col'| <= r; r = 0: everywhere); 0 elsewhere
    keep the topk largest A_t(i, .) over the whole context, zero the rest, normalise each row to sum 1
    y_t^i    = sum_j A_t(i,j) y_s^j       K + 1 channels (background, objects 1..K), at patch resolution
    label    = argmax_k minmax( bilinear upsampling of y_t by the patch size )_k, each channel min-max
               normalised over the frame, then resized to the frame's own size (nearest)

Official defaults: n_last_frames m = 7, size_mask_neighborhood r = 12 patches, topk = 5, temperature T = 0.1;
frames resized (bilinear) so that the shorter side is 480 px and the longer a multiple of 64; ImageNet
normalisation; the first mask is brought to the patch grid by nearest-neighbour resizing. Outputs: one
palette PNG per frame with DAVIS's palette (PASCAL VOC's colour map), the first frame's being its annotation.

Scores, as the DAVIS-2017 toolkit (davis2017-evaluation, semi-supervised task): for object k on frame t,
    J = |M ∩ G| / |M ∪ G|                region similarity (1 when both masks are empty)
    F = 2 P R / (P + R)                   boundary accuracy: P and R the share of predicted / ground-truth
                                          boundary pixels within ceil(0.008 x image diagonal) px of the other's
over every frame but the first (given) and the last; objects are 1 .. the largest id of the first annotation
(void 255 counts as background). J mean = mean over all objects of all sequences of each object's mean over
its frames (not a mean over sequences); F mean alike; J&F mean = (J mean + F mean) / 2.
Paper, Table 5 ((J&F, J, F) on DAVIS-2017 val): DINO ViT-S/16 61.8, 60.2, 63.4; ViT-S/8 69.9, 66.6, 73.1;
ViT-B/8 71.4, 67.9, 74.9; supervised ViT-S/8 66.0, 63.9, 68.1.

Departures:
- The neighbourhood mask is built from two 1-D comparisons, once per frame size (cached), where the official
  code fills an (hw x hw) matrix with four nested Python loops for every sequence; the top-k is taken on the
  cosines and exp(./T) normalised over the k kept (a softmax: the same weights, without exp overflowing for a
  small T), in chunks of target patches so that memory stays bounded. Ties at the k-th value keep exactly k.
- The official resizing (longer side floored to a multiple of 64) is kept at its 480 px; at any other
  --image_size the longer side is floored to a multiple of the patch size instead, since 64 px steps would
  squash small frames (96 x 48 px to 64 x 48). The shorter side is floored to a multiple of the patch size.
- --image_size defaults to the frames' own shorter side: 480 on DAVIS's 480p frames, as official, and the
  embedded scenes at their size; a channel that is constant over the frame is left as it is by the min-max
  normalisation (the official code divides 0 by 0 there); ImageNet's std 0.229 for red (official: 0.228).
- J and F are computed here, with the toolkit's definitions (the official script only writes the PNGs);
  temperature, topk and the neighbourhood are flags (the official script hard-codes T = 0.1).

Usage:
    python 11_video.py --checkpoint OUT/checkpoint.pth --data_path scenes --output_dir video
    python 11_video.py --random_init --arch vit_nano --patch_size 8 --data_path scenes --output_dir video_random
    python 11_video.py --pretrained dino_vits16 --data_path /path/to/DAVIS --output_dir davis   # Table 5, on a GPU
Prints one line per sequence, then `J mean: XX.X`, `F mean: XX.X`, `J&F mean: XX.X`; writes OUTPUT_DIR/SEQ/*.png
and OUTPUT_DIR/scores.json (per sequence and per object).
"""
import collections
import functools
import importlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torchvision.transforms import functional as TF

import checkpoint as ckpt
import cli
import data

multicrop = importlib.import_module("01_multicrop")
knn = importlib.import_module("06_knn")
VOID = 255  # DAVIS's "ignore" label, background for the semi-supervised scores
BOUND_TH = 0.008  # boundary tolerance of F, as a fraction of the image diagonal (the toolkit's default)


# ---------------------------------------------------------------------------- the data
@dataclass
class Sequence:
    """One video: its frames (PIL images, or JPEG paths read when needed) and their annotations (uint8 arrays
    of object ids, or PNG paths), in order; `names`: each frame's output file, without .png."""
    name: str
    frames: list
    masks: list
    names: list


def davis_palette():
    """DAVIS's palette, PASCAL VOC's colour map: the bits of the label, interleaved into R, G, B from the top bit
    down (0 black, 1 (128, 0, 0), 2 (0, 128, 0), 3 (128, 128, 0), ...). (256, 3) uint8."""
    label = np.arange(256)
    palette = np.zeros((256, 3), np.uint8)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((label >> (3 * bit + channel)) & 1).astype(np.uint8) << (7 - bit)
    return palette


def write_mask(path, mask):
    image = Image.fromarray(mask.astype(np.uint8))
    image.putpalette(davis_palette().ravel().tolist())  # an 8-bit image with a palette: mode P
    image.save(path)


def read_mask(mask):
    """Object ids, (H, W) uint8, from an array or an indexed PNG (palette or 8-bit grey: the value is the id)."""
    if isinstance(mask, np.ndarray):
        return mask.astype(np.uint8)
    try:
        image = Image.open(mask)
        image.load()
    except Exception as e:  # bytes from anywhere can raise anything inside PIL
        reason = (str(e).splitlines() or ["no message"])[0][:200]
        raise data.DataError(f"unreadable annotation {mask} ({type(e).__name__}: {reason}); re-save it as a "
                             f"palette PNG") from None
    if image.mode not in ("P", "L", "1"):
        raise data.DataError(f"annotation {mask} has mode {image.mode}, not object ids; save it as a palette (P) "
                             f"PNG whose values are 0 (background), 1, 2, ... as DAVIS's are")
    return np.array(image, dtype=np.uint8)


def read_frame(frame):
    return frame if isinstance(frame, Image.Image) else data.open_image(frame)


def davis_sequences(root):
    """The sequences of a folder laid out as DAVIS-2017: those of ImageSets/2017/val.txt if it exists, else every
    folder of JPEGImages/480p; each frame SEQ/NAME.jpg annotated by Annotations/480p/SEQ/NAME.png."""
    root = Path(root)
    images, annotations, listing = root / "JPEGImages/480p", root / "Annotations/480p", root / "ImageSets/2017/val.txt"
    if not images.is_dir():
        raise data.DataError(f"{root} is not a DAVIS folder ({images} is missing); pass a folder laid out as DAVIS-2017 "
                             f"(JPEGImages/480p/SEQ/*.jpg, Annotations/480p/SEQ/*.png) or --data_path scenes")
    names = ([n.strip() for n in listing.read_text(errors="replace").splitlines() if n.strip()] if listing.is_file()
             else sorted(p.name for p in images.iterdir() if p.is_dir()))
    if not names:
        raise data.DataError(f"no sequences in {listing if listing.is_file() else images}; add sequence folders")
    for name in names:  # each names a folder of outputs too, which must stay inside --output_dir
        if name in (".", "..") or Path(name).name != name:
            raise data.DataError(f"{listing} lists {name!r}, not a sequence folder's name; list one name per line")
    sequences = []
    for name in names:
        frames = sorted((images / name).glob("*.jpg"))
        if not frames:
            raise data.DataError(f"empty sequence {images / name}: no .jpg frames; add them, or remove {name}"
                                 + (f" from {listing}" if listing.is_file() else ""))
        masks = [annotations / name / (f.stem + ".png") for f in frames]
        if not masks[0].is_file():
            raise data.DataError(f"no first-frame annotation {masks[0]}: propagation starts from the first frame's "
                                 f"mask; add it (a palette PNG of object ids)")
        missing = [m for m in masks if not m.is_file()]
        if missing:
            raise data.DataError(f"missing annotation {missing[0]} ({len(missing)} in {name}): every frame is scored "
                                 f"against its annotation; add it or remove the frame")
        sequences.append(Sequence(name, frames, masks, [f.stem for f in frames]))
    return sequences


def scene_sequences():
    """The embedded videos of scenes.py (its val split), read lazily: this file works without them."""
    try:
        scenes = importlib.import_module("scenes")
    except ModuleNotFoundError as e:
        if e.name != "scenes":
            raise
        raise data.DataError("scenes data not available (no scenes.py); pass a DAVIS folder as --data_path") from None
    return [Sequence(name, list(frames), [np.asarray(m) for m in masks], [f"{i:05d}" for i in range(len(frames))])
            for name, frames, masks in scenes.video_sequences(split="val")]


def load_sequences(data_path):
    return scene_sequences() if data_path == "scenes" else davis_sequences(data_path)


def resized_shape(height, width, image_size, patch_size):
    """(h, w) in pixels: the shorter side at image_size, the longer scaled alike; at the official 480 px, floored
    to a multiple of 64 as official (854 x 480 -> 832 x 480), at any other size to a multiple of the patch size."""
    short, long = min(height, width), max(height, width)
    step = 64 if image_size == 480 else patch_size
    s, l = image_size // patch_size * patch_size, int(long * image_size / short // step * step)
    return (s, l) if height <= width else (l, s)


def objects(mask):
    return np.where(mask == VOID, 0, mask)


def check_sequences(sequences, patch_size, image_size, topk):
    """Everything that can be wrong with the data, found before anything is written: every frame and annotation is
    read once (sizes, objects), and each sequence's patch grid is checked against the flags."""
    for seq in sequences:
        def where(x, i, what):
            return str(x) if isinstance(x, (str, Path)) else f"scenes sequence {seq.name} {what} {i}"
        if len(seq.frames) < 3:
            raise data.DataError(f"{'empty' if not seq.frames else 'short'} sequence {seq.name} ({len(seq.frames)} "
                                 f"frames): DAVIS scores the frames between the first and the last, so a sequence "
                                 f"needs at least 3; add frames or remove it")
        size = None
        for i, (frame, mask) in enumerate(zip(seq.frames, seq.masks)):
            w, h = read_frame(frame).size
            if size and (w, h) != size:
                raise data.DataError(f"{where(frame, i, 'frame')} is {w} x {h} px but the first frame of {seq.name} is "
                                     f"{size[0]} x {size[1]} px; the frames of a sequence must share one size: resize "
                                     f"or remove it")
            size = (w, h)
            m = read_mask(mask)
            if m.shape != (h, w):
                raise data.DataError(f"annotation {where(mask, i, 'mask')} is {' x '.join(map(str, m.shape[::-1]))} px "
                                     f"but its frame is {w} x {h} px; an annotation must have its frame's size")
            if i == 0 and not objects(m).any():
                raise data.DataError(f"the first annotation {where(mask, i, 'mask')} has no object (only background 0 "
                                     f"or void 255); label the objects to follow with ids 1, 2, ... or remove "
                                     f"{seq.name}")
        th, tw = resized_shape(size[1], size[0], image_size or min(size), patch_size)
        n = (th // patch_size) * (tw // patch_size)
        if not 1 <= n <= cli.MAX_SIDE ** 2:
            raise cli.UsageError(f"{seq.name}'s {size[0]} x {size[1]} px frames at --image_size "
                                 f"{image_size or min(size)} are {tw} x {th} px: {n} patches of {patch_size} px; "
                                 f"choose an --image_size that gives 1 to {cli.MAX_SIDE ** 2}")
        if topk > n:
            raise cli.UsageError(f"--topk {topk} exceeds the {n} patches of a frame of {seq.name} ({tw} x {th} px, "
                                 f"patch {patch_size}); choose at most {n}")


# ---------------------------------------------------------------------------- the propagation
def frame_tensor(image, shape):
    """(3, h, w): resized bilinearly without antialiasing (as the official cv2.resize), ImageNet-normalised."""
    x = F.interpolate(TF.to_tensor(image)[None], size=shape, mode="bilinear", align_corners=False)[0]
    return TF.normalize(x, multicrop.IMAGENET_MEAN, multicrop.IMAGENET_STD)


@torch.no_grad()
def patch_features(model, x):
    """f: the last block's patch tokens (CLS dropped), L2-normalised. x (3, h, w) -> (h/p w/p, D)."""
    tokens = model.get_intermediate_layers(x[None], n=1)[0]  # (1, N, D)
    return F.normalize(tokens[0, 1:], dim=-1)  # (N-1, D)


@functools.lru_cache(maxsize=8)
def neighbourhood(h, w, r, device="cpu"):
    """(h w, h w) bool: target patch (i, j) may take labels from context patch (i', j') iff |i - i'| <= r and
    |j - j'| <= r. Two 1-D comparisons, broadcast: once per frame size, where the official code loops four times."""
    rows, cols = torch.arange(h, device=device), torch.arange(w, device=device)
    near_rows = (rows[:, None] - rows[None, :]).abs() <= r  # (h, h)
    near_cols = (cols[:, None] - cols[None, :]).abs() <= r  # (w, w)
    return rearrange(near_rows[:, None, :, None] & near_cols[None, :, None, :], "i j i2 j2 -> (i j) (i2 j2)")


def propagate(feat, context_feats, context_masks, near, topk, temperature, chunk=1024):
    """y_t: the target's soft masks from its context, (C, n).
    feat (n, D) the target's features; context_feats (m, n, D) and context_masks (m, C, n) those of the m context
    frames; near (n, n) bool, or None for no neighbourhood. Features are L2-normalised, so products are cosines."""
    m, C, n = context_masks.shape
    keys = context_feats.reshape(m * n, -1)  # (m n, D)
    labels = rearrange(context_masks, "m c n -> c (m n)")  # (C, m n)
    out = []
    for s in range(0, len(feat), chunk):  # (chunk, m n) cosines at a time: 8 context frames at 480p are 1.2 GB at once
        cos = feat[s:s + chunk] @ keys.T  # (b, m n)
        if near is not None:
            cos = cos.masked_fill(~near[s:s + chunk].repeat(1, m), -math.inf)  # exp(-inf / T) = 0
        top, idx = cos.topk(topk, dim=1)  # (b, k): exp(./T) is increasing, so the largest A are the largest cosines
        # A = exp(cos / T) normalised over the k kept: a softmax, in float64 and shifted by the row's max so that
        # no T > 0 overflows it
        weights = torch.softmax((top - top[:, :1]).double() / temperature, dim=1).to(top.dtype)  # (b, k)
        out.append((labels[:, idx] * weights).sum(-1))  # (C, b)
    return torch.cat(out, dim=1)  # (C, n)


def decode(y, h, w, patch_size, size):
    """Labels (H, W) uint8 from soft masks y (C, h w): upsampled bilinearly by the patch size, each channel
    min-max normalised over the frame (a faint object keeps its place), argmax, resized to size (H, W)."""
    y = F.interpolate(y.reshape(1, -1, h, w), scale_factor=patch_size, mode="bilinear", align_corners=False)[0]
    lo, hi = y.amin(dim=(1, 2), keepdim=True), y.amax(dim=(1, 2), keepdim=True)
    y = torch.where((hi > 0) & (hi > lo), (y - lo) / (hi - lo), y)  # (C, h p, w p)
    labels = y.argmax(dim=0)[None, None].float()
    return F.interpolate(labels, size=size, mode="nearest-exact")[0, 0].to(torch.uint8).cpu().numpy()


def one_hot(mask, h, w, num_objects):
    """y_0: the first annotation on the patch grid (nearest, as official), (K + 1, h w)."""
    small = F.interpolate(torch.from_numpy(objects(mask))[None, None].float(), size=(h, w), mode="nearest-exact")
    return F.one_hot(small.long().flatten(), num_objects + 1).T.float()  # (K + 1, h w)


@torch.no_grad()
def segment_video(model, frames, first_mask, patch_size, image_size=None, n_last_frames=7, size_mask_neighborhood=12,
                  topk=5, temperature=0.1):
    """Label propagation through one video: a list with one (H, W) uint8 mask per frame, the first being the
    annotation itself. frames: an iterable of PIL images of one size; first_mask: (H, W) object ids."""
    device = next(model.parameters()).device
    frames = iter(frames)
    first = next(frames)
    H, W = first_mask.shape
    shape = resized_shape(H, W, image_size or min(H, W), patch_size)
    h, w = shape[0] // patch_size, shape[1] // patch_size
    y0 = one_hot(first_mask, h, w, int(objects(first_mask).max())).to(device)  # (K + 1, h w)
    f0 = patch_features(model, frame_tensor(first, shape).to(device))  # (h w, D)
    near = neighbourhood(h, w, size_mask_neighborhood, device) if size_mask_neighborhood > 0 else None
    previous = collections.deque(maxlen=n_last_frames)  # (f_s, y_s) of the m previous frames
    masks = [objects(first_mask).astype(np.uint8)]
    for frame in frames:
        f = patch_features(model, frame_tensor(frame, shape).to(device))
        feats = torch.stack([f0] + [p[0] for p in previous])  # (1 + m, h w, D)
        ys = torch.stack([y0] + [p[1] for p in previous])  # (1 + m, K + 1, h w)
        y = propagate(f, feats, ys, near, topk, temperature)  # (K + 1, h w)
        previous.append((f, y))  # the soft masks, before upsampling, are the context of the next frames
        masks.append(decode(y, h, w, patch_size, (H, W)))
    return masks


# ---------------------------------------------------------------------------- the scores
def region_similarity(pred, gt):
    """J: intersection over union of two boolean masks, 1 when both are empty."""
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else np.logical_and(pred, gt).sum() / union


def boundary(mask):
    """The toolkit's one-pixel boundary (Martin et al.'s seg2bmap): pixels that differ from their right, lower or
    lower-right neighbour; the image's own border is no boundary (the edge is repeated)."""
    p = np.pad(mask, ((0, 1), (0, 1)), mode="edge")
    return (mask != p[:-1, 1:]) | (mask != p[1:, :-1]) | (mask != p[1:, 1:])


def dilate(mask, radius):
    """Binary dilation by a disk of the radius (x^2 + y^2 <= r^2), as a convolution."""
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disk = torch.from_numpy((x ** 2 + y ** 2 <= radius ** 2).astype(np.float32))[None, None]
    hits = F.conv2d(torch.from_numpy(mask.astype(np.float32))[None, None], disk, padding=radius)
    return hits[0, 0].numpy() > 0.5


def boundary_f(pred, gt, bound_th=BOUND_TH):
    """F: the boundaries' F-measure, each boundary pixel matched if the other boundary lies within
    ceil(bound_th x image diagonal) px. Empty boundaries follow the toolkit: both empty 1, one empty 0."""
    radius = int(math.ceil(bound_th * math.hypot(*gt.shape)))
    pred_b, gt_b = boundary(pred), boundary(gt)
    if not pred_b.any() or not gt_b.any():
        return float(pred_b.any() == gt_b.any())
    precision = (pred_b & dilate(gt_b, radius)).sum() / pred_b.sum()
    recall = (gt_b & dilate(pred_b, radius)).sum() / gt_b.sum()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def score_sequence(preds, gts):
    """{"J": [...], "F": [...]}: per object 1..K (K from the first annotation), the mean over the frames
    between the first and the last (%)."""
    num_objects = int(objects(gts[0]).max())
    scores = {"J": [], "F": []}
    for k in range(1, num_objects + 1):
        pairs = [(p == k, g == k) for p, g in zip(preds[1:-1], gts[1:-1])]
        scores["J"].append(100 * float(np.mean([region_similarity(p, g) for p, g in pairs])))
        scores["F"].append(100 * float(np.mean([boundary_f(p, g) for p, g in pairs])))
    return scores


# ---------------------------------------------------------------------------- the command line
def get_args_parser():
    p = cli.Parser("Video object segmentation by label propagation (DAVIS-2017 protocol)")
    cli.add_backbone_args(p, knn.vits.ARCHS, raw_pixels=False)
    p.add_argument("--data_path", default="scenes",
                   help="a folder laid out as DAVIS-2017 (JPEGImages/480p, Annotations/480p, optionally "
                        "ImageSets/2017/val.txt), or scenes: the embedded videos")
    p.add_argument("--image_size", type=cli.positive_int, default=None,
                   help="shorter side of the frames in pixels; default: the frames' own (480 on DAVIS 480p, as "
                        "official), whatever size the network was trained at")
    p.add_argument("--n_last_frames", type=cli.nonneg_int, default=7,
                   help="previous frames in the context besides the first: their predicted masks carry the object "
                        "as it changes; 0: the first frame alone")
    p.add_argument("--size_mask_neighborhood", type=cli.nonneg_int, default=12,
                   help="radius in patches around a patch where its labels may come from: objects move little "
                        "between frames; 0: anywhere")
    p.add_argument("--topk", type=cli.positive_int, default=5,
                   help="neighbours each patch takes its labels from, over the whole context")
    p.add_argument("--temperature", type=cli.positive_float, default=0.1,
                   help="T in exp(cos / T): how much closer neighbours outweigh the others among the top k")
    p.add_argument("--output_dir", type=cli.directory, default="video_segmentation",
                   help="where SEQ/*.png (palette PNGs, as DAVIS's) and scores.json go")
    return p


def prepare(args):
    """Everything that can be wrong with the input, found before any work: (backbone, sequences)."""
    cli.check_output_dir(args.output_dir)
    requested = args.image_size
    model, _, _ = knn.build_backbone(args)  # sets --arch / --patch_size from a checkpoint or a released name
    args.image_size = requested  # and the frames keep their size: the official evaluates at 480 px, not at 224
    sequences = load_sequences(args.data_path)
    check_sequences(sequences, args.patch_size, args.image_size, args.topk)
    return model, sequences


def main(args):
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, sequences = prepare(args)
    model.to(device).eval()
    what = "random init" if args.random_init else args.checkpoint or args.pretrained
    print(f"{args.arch}/{args.patch_size} ({what}) on {args.data_path}: {len(sequences)} sequences; n_last_frames "
          f"{args.n_last_frames}, size_mask_neighborhood {args.size_mask_neighborhood}, topk {args.topk}, temperature "
          f"{args.temperature}, shorter side {args.image_size or 'as the frames'}")
    out_dir = Path(args.output_dir)
    results, total_frames, total_seconds = {}, 0, 0.0
    for seq in sequences:
        gts = [read_mask(m) for m in seq.masks]
        start = time.perf_counter()
        preds = segment_video(model, (read_frame(f) for f in seq.frames), gts[0], args.patch_size, args.image_size,
                              args.n_last_frames, args.size_mask_neighborhood, args.topk, args.temperature)
        seconds = time.perf_counter() - start
        (out_dir / seq.name).mkdir(parents=True, exist_ok=True)
        for name, pred in zip(seq.names, preds):
            write_mask(out_dir / seq.name / f"{name}.png", pred)
        scores = score_sequence(preds, gts)
        results[seq.name] = {"frames": len(preds), "J": float(np.mean(scores["J"])), "F": float(np.mean(scores["F"])),
                             "J_per_object": scores["J"], "F_per_object": scores["F"],
                             "seconds_per_frame": seconds / len(preds)}
        total_frames, total_seconds = total_frames + len(preds), total_seconds + seconds
        print(f"  {seq.name}: {len(preds)} frames, {len(scores['J'])} object(s), J {results[seq.name]['J']:.1f}, "
              f"F {results[seq.name]['F']:.1f} ({seconds / len(preds):.3f} s per frame)")
    j_mean = float(np.mean([j for r in results.values() for j in r["J_per_object"]]))  # over objects, as DAVIS
    f_mean = float(np.mean([f for r in results.values() for f in r["F_per_object"]]))
    ckpt.save_json({"source": str(what), "arch": args.arch, "patch_size": args.patch_size, "data_path": args.data_path,
                    "image_size": args.image_size, "n_last_frames": args.n_last_frames,
                    "size_mask_neighborhood": args.size_mask_neighborhood, "topk": args.topk,
                    "temperature": args.temperature, "J_mean": j_mean, "F_mean": f_mean,
                    "J&F_mean": (j_mean + f_mean) / 2, "seconds_per_frame": total_seconds / total_frames,
                    "sequences": results}, out_dir / "scores.json")
    print(f"{total_frames} frames in {total_seconds:.1f} s ({total_seconds / total_frames:.3f} s per frame on "
          f"{device.type}); masks and scores.json in {out_dir}")
    print(f"J mean: {j_mean:.1f}\nF mean: {f_mean:.1f}\nJ&F mean: {(j_mean + f_mean) / 2:.1f}")


if __name__ == "__main__":
    sys.exit(cli.run(main, get_args_parser().parse_args))
