"""Linear evaluation on frozen features (paper Sec. 4.1 "Linear and k-NN classification on ImageNet",
Table 2; official eval_linear.py).

    z(x) = [LN(z_{L-n+1}^0); ...; LN(z_L^0)]   the CLS token of each of the last n blocks, through the final norm
    z(x) = [LN(z_L^0); mean_i LN(z_L^i)]        ViT-B: n = 1, plus the average of the patch tokens
    y    = W z(x) + b                            W ~ N(0, 0.01^2), b = 0; only W and b learn, the backbone is frozen
    loss = cross-entropy(y, label)               SGD, momentum 0.9, no weight decay, E = 100 epochs
    lr_e = lr / 2 (1 + cos(pi e / E))            lr = 0.001 x batch / 256, cosine to 0 over the epochs

Training images get RandomResizedCrop + horizontal flip, so every epoch runs the frozen backbone
over the training set again; validation images are resized to 256/224 of the crop size and
centre-cropped (06_knn.eval_transform). Reported: top-1 and top-5 on the validation split. The
paper's headline numbers: ViT-S/16 77.0 %, ViT-S/8 79.7 % linear, against 74.5 / 78.3 % k-NN.
Official defaults: n = 4 for ViT-S, n = 1 with the mean patch token for ViT-B (avgpool_patchtokens),
batch 128 per GPU. The features get no normalisation beyond the backbone's own final LayerNorm.

Departures:
- `--precomputed`, for CPUs: the training images' features are extracted once, without
  augmentation (the validation transform), and the linear layer trains on them in memory: one pass
  of the backbone instead of 100; without augmentation the classifier overfits more easily.
- The number reported is the accuracy after the last epoch; the official script validates after
  every epoch and reports the best, a choice made on the validation set itself.
- The mean patch token is appended after the CLS tokens; the official code interleaves the two,
  which only permutes W's columns. It also allows n > 1 with it (the official code does not).
- One process; any number of classes, matched by name between train/ and val/ (as in 06_knn.py);
  `--raw_pixels`: the flattened pixels as features, a baseline.

Usage:
    python 08_linear.py --checkpoint OUT/checkpoint.pth --data_path textures --precomputed
    python 08_linear.py --random_init --arch vit_nano --patch_size 8 --image_size 32 --data_path textures --precomputed
    python 08_linear.py --pretrained dino_vits16 --data_path /path/to/imagenet      # the paper's protocol
"""
import argparse
import importlib
import os
import sys
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms

import checkpoint as ckpt
import cli
import data
import images
import runtime

multicrop = importlib.import_module("01_multicrop")
knn = importlib.import_module("06_knn")


class LinearClassifier(nn.Module):
    """y = W z + b, W ~ N(0, 0.01^2), b = 0 (official name and keys)."""

    def __init__(self, dim, num_labels):
        super().__init__()
        self.linear = nn.Linear(dim, num_labels)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, z):
        return self.linear(z)


def train_transform(image_size):
    """The official training augmentation of the linear probe: crop at a random scale, flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(multicrop.IMAGENET_MEAN, multicrop.IMAGENET_STD),
    ])


@torch.no_grad()
def features(backbone, images, n_last_blocks, avgpool):
    """z(x), (B, (n + avgpool) D); without get_intermediate_layers (raw pixels), backbone(x)."""
    if not hasattr(backbone, "get_intermediate_layers"):
        return backbone(images)
    out = backbone.get_intermediate_layers(images, n_last_blocks)  # n x (B, N, D), each through the final norm
    z = torch.cat([x[:, 0] for x in out], dim=-1)  # (B, n D): the CLS tokens
    if avgpool:
        z = torch.cat((z, out[-1][:, 1:].mean(dim=1)), dim=-1)  # (B, (n + 1) D)
    return z


def feature_batches(backbone, loader, args, device, dtype):
    """(z, labels) per batch of a loader, the frozen backbone run on the fly."""
    for images, labels in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            z = features(backbone, images.to(device, non_blocking=True), args.n_last_blocks, args.avgpool_patchtokens)
        yield z.float(), torch.as_tensor(labels, device=device)


def in_memory_batches(z, labels, batch_size):
    """Shuffled batches of precomputed features: one epoch."""
    perm = torch.randperm(len(labels), device=z.device)
    for i in range(0, len(labels), batch_size):
        yield z[perm[i:i + batch_size]], labels[perm[i:i + batch_size]]


def train_linear(classifier, epoch_batches, epochs, lr):
    """SGD on W and b only; the cosine schedule steps once per epoch, as the official one."""
    opt = torch.optim.SGD(classifier.parameters(), lr, momentum=0.9, weight_decay=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0)
    for epoch in range(epochs):
        for z, y in epoch_batches():
            loss = F.cross_entropy(classifier(z), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if (epoch + 1) % max(1, epochs // 5) == 0:
            print(f"  epoch {epoch + 1:>3}/{epochs}: loss {loss.item():.3f}")


@torch.no_grad()
def accuracy(classifier, z, labels):
    """Top-1 and top-5 accuracy (%); top-k with k capped at the number of classes."""
    logits = classifier(z)
    correct = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(labels[:, None])  # (n, k)
    n = len(labels)
    return 100.0 * correct[:, 0].sum().item() / n, 100.0 * correct.any(dim=1).sum().item() / n


def get_args_parser():
    p = cli.Parser("Linear evaluation of DINO features")
    cli.add_backbone_args(p, knn.vits.ARCHS)
    p.add_argument("--image_size", type=cli.positive_int, default=None,
                   help="crop size; default: the checkpoint's global crop size, else 224")
    p.add_argument("--n_last_blocks", type=cli.positive_int, default=None,
                   help="concatenate the CLS tokens of this many last blocks; default: 4 (the official choice for "
                        "ViT-S, used for the smaller ViTs too), 1 for ViT-B")
    p.add_argument("--avgpool_patchtokens", action=argparse.BooleanOptionalAction, default=None,
                   help="also append the mean patch token of the last block; default: on for ViT-B only, as official")
    p.add_argument("--epochs", type=cli.positive_int, default=100)
    p.add_argument("--lr", type=cli.positive_float, default=0.001,
                   help="for a batch of 256, scaled linearly with the batch; the official help advises tuning it "
                        "per checkpoint")
    p.add_argument("--batch_size_per_gpu", type=cli.positive_int, default=128)
    p.add_argument("--precomputed", action="store_true",
                   help="extract un-augmented training features once and train on them in memory (fast; a departure)")
    p.add_argument("--data_path", default="textures",
                   help="ImageFolder with train/ and val/, or " + ", ".join(data.BUILTIN))
    p.add_argument("--num_workers", type=cli.nonneg_int, default=2)
    p.add_argument("--output_dir", type=cli.directory, default=None, help=cli.output_dir_help("linear"))
    return p


def prepare(args):
    """Everything that can be wrong with the input, found before any work:
    (backbone, image_size, out_dir, train_set, val_set, val labels in train's numbering)."""
    backbone, image_size, out_dir = knn.prepare(args)  # also sets --arch / --patch_size from the source
    if args.n_last_blocks is None:  # the official choice per architecture
        args.n_last_blocks = 1 if args.arch == "vit_base" else 4
    if args.avgpool_patchtokens is None:
        args.avgpool_patchtokens = args.arch == "vit_base"
    depth = len(getattr(backbone, "blocks", ()))  # 0 for raw pixels
    if depth and args.n_last_blocks > depth:
        raise cli.UsageError(f"--n_last_blocks {args.n_last_blocks} exceeds the {depth} blocks of {args.arch}")
    eval_tf = knn.eval_transform(image_size)
    train_tf = eval_tf if args.precomputed else train_transform(image_size)
    shrink = images.shrink_side([(image_size, 0.08), (knn.eval_resize(image_size), None)])  # large files: once
    train_set = data.build_dataset(args.data_path, "train", train_tf, shrink=shrink)
    if len(train_set.classes) < 2:  # every answer would be right: 100 % that means nothing
        raise cli.UsageError(f"the training images of {args.data_path} are of one class ({train_set.classes[0]}); "
                             f"a linear probe needs at least two: add class folders (ROOT/train/CLASS/image.jpg)")
    val_set = data.build_dataset(args.data_path, "val", eval_tf, shrink=shrink)
    return backbone, image_size, out_dir, train_set, val_set, knn.match_classes(train_set, val_set)


def main(args):
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone, image_size, out_dir, train_set, val_set, val_to_train = prepare(args)
    dtype = runtime.inference_dtype(device)
    if device.type == "cpu":  # as train.py: the loader's workers need cores too
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - args.num_workers)))
    backbone.to(device).eval().requires_grad_(False)
    batch = min(args.batch_size_per_gpu, len(train_set))  # what each step really sees, and so what scales the lr
    if batch < args.batch_size_per_gpu:
        print(f"note: --batch_size_per_gpu {args.batch_size_per_gpu} is more than the {batch} training images: "
              f"batches of {batch}, and the lr scaled by {batch} / 256")

    def loader(dataset, shuffle):
        return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=shuffle,
                                           num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                           worker_init_fn=runtime.ignore_stop_signals)

    def extract(dataset):
        z, y = zip(*feature_batches(backbone, loader(dataset, False), args, device, dtype))
        return torch.cat(z), torch.cat(y)

    val_z, val_y = extract(val_set)
    val_y = val_to_train.to(device)[val_y]
    if args.precomputed:
        train_z, train_y = extract(train_set)
        epoch_batches = partial(in_memory_batches, train_z, train_y, batch)
    else:
        epoch_batches = partial(feature_batches, backbone, loader(train_set, True), args, device, dtype)
    num_labels = len(train_set.classes)
    classifier = LinearClassifier(val_z.shape[1], num_labels).to(device)
    lr = args.lr * batch / 256  # the linear scaling rule, one process
    what = cli.source_name(args)
    z_desc = ("pixels" if args.raw_pixels else f"{args.arch}/{args.patch_size}, CLS of the last "
              f"{args.n_last_blocks} blocks" + (" + mean patch token" if args.avgpool_patchtokens else ""))
    print(f"{z_desc} ({what}) on {args.data_path} at {image_size} px: {val_z.shape[1]} features, {num_labels} "
          f"classes; {args.epochs} epochs, batch {batch}, lr {lr:g}, "
          f"{'precomputed features' if args.precomputed else 'augmented training images'}")
    train_linear(classifier, epoch_batches, args.epochs, lr)
    top1, top5 = accuracy(classifier, val_z, val_y)
    print(f"linear: top-1 {top1:.2f}%  top-5 {top5:.2f}% on {len(val_y)} validation images")
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt.save_json({"source": str(what), "arch": args.arch, "patch_size": args.patch_size, "data_path": args.data_path,
                    "image_size": image_size, "n_last_blocks": args.n_last_blocks,
                    "avgpool_patchtokens": args.avgpool_patchtokens, "precomputed": args.precomputed,
                    "epochs": args.epochs, "batch_size": batch, "lr": lr,
                    "top1": top1, "top5": top5}, out_dir / cli.results_name(args, "linear"))
    print(f"linear top-1: {top1:.2f}%")


if __name__ == "__main__":
    sys.exit(cli.run(main, get_args_parser().parse_args))
