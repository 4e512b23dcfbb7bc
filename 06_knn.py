"""Weighted k-NN evaluation of frozen features (paper Sec. 4.1 "Evaluation protocols", following
Wu et al. 2018; official eval_knn.py).

    f(x)     = l2norm( CLS feature of the frozen teacher backbone )
    s_i      = <f(x), f(x_i)>                     cosine similarity to every training image
    score_c  = sum over the k most similar x_i of class c of exp(s_i / T)
    predict  = argmax_c score_c                     T = 0.07, k = 20 (also 10, 100, 200)

No training, no hyper-parameter tuning: the features alone decide. Images are resized and
centre-cropped at the training resolution (Resize(256) + CenterCrop(224) at ImageNet scale).

Departures from the official script: any number of classes and any test-set size (it hard-codes
1000 classes and breaks under 100 test images); k is capped at the size of the memory bank;
one process or many without a mandatory process group.

Usage:
    python 06_knn.py --checkpoint OUT/checkpoint.pth --data_path textures
    python 06_knn.py --random_init --arch vit_nano --patch_size 8 --image_size 32 --data_path textures
    python 06_knn.py --raw_pixels --image_size 32 --data_path textures
    python 06_knn.py --pretrained dino_deitsmall16_pretrain.pth --arch vit_small --data_path DIR
    python 06_knn.py --pretrained dino_vits16 --data_path DIR     # the released weights, by name
"""
import argparse
import importlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision import transforms

import checkpoint as ckpt
import cli
import data
import images
import runtime

multicrop = importlib.import_module("01_multicrop")
vits = importlib.import_module("02_vit")


def eval_resize(image_size):
    return int(round(image_size * 256 / 224))


def eval_transform(image_size):
    """Resize to 256/224 of the crop size, then centre-crop: the official protocol at any scale."""
    return transforms.Compose([
        transforms.Resize(eval_resize(image_size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(multicrop.IMAGENET_MEAN, multicrop.IMAGENET_STD),
    ])


@torch.no_grad()
def embed_batches(model, dataset, device, batch_size=256, num_workers=0, dtype=None, embed=None, progress=None):
    """(features, targets) for each batch of a dataset, in order: float32 (b, D) on `device`, not normalised.
    features = model(images), the CLS feature, or embed(model, images). Only a batch of decoded images is held
    at a time (and the loader's prefetch), so a folder of any size streams through. progress: a tqdm label."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         pin_memory=device.type == "cuda", worker_init_fn=runtime.ignore_stop_signals)
    if progress:
        from tqdm import tqdm
        loader = tqdm(loader, desc=progress, unit="batch", disable=None)  # None: a bar on a terminal, not in logs
    model.eval()
    for images, targets in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            images = images.to(device, non_blocking=True)
            f = model(images) if embed is None else embed(model, images)
        yield f.float(), targets


@torch.no_grad()
def extract_features(model, dataset, device, batch_size=256, num_workers=0, dtype=None):
    """L2-normalised CLS features and labels of a whole dataset, (n, D) and (n,). With a process
    group, each rank embeds every world_size-th image and the pieces are gathered in order."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    n = len(dataset)
    subset = torch.utils.data.Subset(dataset, range(rank, n, world))
    feats, labels = [], []
    for f, targets in embed_batches(model, subset, device, batch_size, num_workers, dtype):
        feats.append(F.normalize(f, dim=1))
        labels.append(torch.as_tensor(targets, device=device))
    feats, labels = torch.cat(feats), torch.cat(labels)
    if distributed:  # rank r holds images r, r + W, r + 2W, ...: pad, gather, interleave
        m = -(-n // world)
        feats = F.pad(feats, (0, 0, 0, m - len(feats)))
        labels = F.pad(labels, (0, m - len(labels)))
        all_f, all_l = [torch.empty_like(feats) for _ in range(world)], [torch.empty_like(labels) for _ in range(world)]
        dist.all_gather(all_f, feats)
        dist.all_gather(all_l, labels)
        feats = torch.stack(all_f, dim=1).reshape(m * world, -1)[:n]
        labels = torch.stack(all_l, dim=1).reshape(-1)[:n]
    return feats, labels


@torch.no_grad()
def knn_classifier(train_features, train_labels, test_features, test_labels, k, T=0.07, num_classes=None,
                   chunk=1024):
    """Top-1 and top-5 accuracy (%) of the exp(s / T)-weighted vote of the k nearest neighbours."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train_labels))
    correct1 = correct5 = 0
    for i in range(0, len(test_labels), chunk):  # bounded memory: (chunk, n_train) similarities at a time
        feats, targets = test_features[i:i + chunk], test_labels[i:i + chunk]
        # exercise knn: votes (b, num_classes): the k training images most similar to each query (cosines s_i: the
        # features are L2-normalised) each vote exp(s_i / T) for its class, train_labels[i]
        sim, idx = (feats @ train_features.T).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(len(targets), num_classes, device=feats.device)
        votes.scatter_add_(1, train_labels[idx], (sim / T).exp())  # score_c = sum exp(s_i / T)
        # end exercise
        pred = votes.argsort(dim=1, descending=True)
        correct = pred.eq(targets[:, None])
        correct1 += correct[:, :1].sum().item()
        correct5 += correct[:, :min(5, num_classes)].sum().item()
    n = len(test_labels)
    return 100.0 * correct1 / n, 100.0 * correct5 / n


def match_classes(train_set, val_set):
    """Val labels in train's numbering, (C_val,): each split numbers its own classes (ImageFolder sorts its
    folders), so they are matched by name. A val class absent from train could never be predicted: an error."""
    train_classes, val_classes = list(train_set.classes), list(val_set.classes)
    missing = [c for c in val_classes if c not in train_classes]
    if missing:
        raise data.DataError(f"the val split has classes that the train split lacks: {', '.join(missing)}; k-NN "
                             f"can only predict classes of its memory bank: add them to train or remove them from val")
    unused = [c for c in train_classes if c not in val_classes]
    if unused:
        print(f"note: train classes without val images (their neighbours still vote): {', '.join(unused)}")
    return torch.tensor([train_classes.index(c) for c in val_classes])


def embed_splits(backbone, data_path, image_size, device, batch_size=256, num_workers=0, dtype=None, shrink=None):
    """The memory bank and the queries: (train features, labels), (val features, labels in train's numbering), and
    the number of classes. Images much larger than the evaluation needs are decoded once, shrunk, and kept
    (images.ShrunkImages): to `shrink` px, or to what the resize needs."""
    tf = eval_transform(image_size)
    shrink = shrink or images.shrink_side([(eval_resize(image_size), None)])
    train_set = data.build_dataset(data_path, "train", tf, shrink=shrink)
    val_set = data.build_dataset(data_path, "val", tf, shrink=shrink)
    val_to_train = match_classes(train_set, val_set)
    train_f, train_l = extract_features(backbone, train_set, device, batch_size, num_workers, dtype)
    test_f, test_l = extract_features(backbone, val_set, device, batch_size, num_workers, dtype)
    return (train_f, train_l), (test_f, val_to_train.to(test_l.device)[test_l]), len(train_set.classes)


def evaluate(backbone, data_path, image_size, device, nb_knn=(10, 20, 100, 200), temperature=0.07,
             batch_size=256, num_workers=0, dtype=None, shrink=None):
    """k-NN accuracies {k: (top1, top5)} of a backbone on a dataset's train (memory) and val (queries)."""
    (train_f, train_l), (test_f, test_l), classes = embed_splits(backbone, data_path, image_size, device, batch_size,
                                                                 num_workers, dtype, shrink)
    return {k: knn_classifier(train_f, train_l, test_f, test_l, k, temperature, classes) for k in nb_knn}


def get_args_parser():
    p = cli.Parser("Weighted k-NN evaluation of DINO features")
    cli.add_backbone_args(p, vits.ARCHS)
    p.add_argument("--image_size", type=cli.positive_int, default=None,
                   help="centre-crop size; default: the checkpoint's global crop size, else 224")
    p.add_argument("--data_path", default="textures",
                   help="ImageFolder with train/ and val/, or " + ", ".join(data.BUILTIN))
    p.add_argument("--nb_knn", type=cli.positive_int, nargs="+", default=[10, 20, 100, 200])
    p.add_argument("--temperature", type=cli.positive_float, default=0.07,
                   help="T in exp(s / T), as in Wu et al. 2018")
    p.add_argument("--batch_size_per_gpu", type=cli.positive_int, default=256)
    p.add_argument("--num_workers", type=cli.nonneg_int, default=2)
    p.add_argument("--output_dir", type=cli.directory, default=None, help=cli.output_dir_help("knn"))
    return p


def build_backbone(args):
    """(backbone, image_size, where the result goes) from --checkpoint / --pretrained / --random_init."""
    if args.checkpoint:
        obj = ckpt.load_file(args.checkpoint)
        train_args = obj.get("args", {}) if isinstance(obj, dict) else {}
        train_args = vars(train_args) if isinstance(train_args, argparse.Namespace) else train_args  # official
        if isinstance(train_args, dict) and "arch" in train_args:
            args.arch, args.patch_size = train_args["arch"], train_args.get("patch_size")
            args.image_size = args.image_size or train_args.get("global_size")
            if args.arch not in vits.ARCHS or not all(isinstance(v, int) and v > 0 for v in
                                                      (args.patch_size, args.image_size or 224)) \
                    or args.patch_size > cli.MAX_PATCH:  # the bound of --patch_size's own type
                raise ckpt.CheckpointError(f"{args.checkpoint} has unusable args (arch {args.arch!r}, patch_size "
                                           f"{args.patch_size!r}, global_size {args.image_size!r}); pass a "
                                           f"checkpoint written by train.py")
        source, out_dir = obj, Path(args.checkpoint).parent
    elif args.pretrained in ckpt.RELEASED:  # a released name: the architecture follows from it
        args.arch, args.patch_size, _ = ckpt.RELEASED[args.pretrained]
        source, out_dir = ckpt.load_released(args.pretrained), Path(".")
    elif args.pretrained:
        source, out_dir = ckpt.load_file(args.pretrained), Path(".")
    elif getattr(args, "raw_pixels", False):  # 07_attention.py has no pixel baseline
        return torch.nn.Flatten(), args.image_size or 224, Path(args.output_dir or ".")
    else:
        source, out_dir = None, Path(".")
    image_size = args.image_size or 224
    side = image_size // args.patch_size
    if not 1 <= side <= cli.MAX_SIDE:
        raise cli.UsageError(f"--image_size {image_size} and --patch_size {args.patch_size} give {side} x {side} "
                             f"patches; choose them for 1 to {cli.MAX_SIDE} patches per side")
    model = vits.ARCHS[args.arch](patch_size=args.patch_size, img_size=image_size)
    if source is not None:
        what = args.checkpoint or args.pretrained
        sd = ckpt.backbone_state_dict(source, args.checkpoint_key, what)
        pos = sd.get("pos_embed")
        if pos is not None and pos.ndim == 3 and pos.shape != model.pos_embed.shape:  # trained at another size
            model = vits.ARCHS[args.arch](patch_size=args.patch_size,
                                          img_size=int(round((pos.shape[1] - 1) ** 0.5)) * args.patch_size)
        ckpt.load_strict(model, sd, what)
    return model, image_size, Path(args.output_dir) if args.output_dir else out_dir


def prepare(args):
    """Everything that can be wrong with the input, found before any work: (backbone, image_size, out_dir)."""
    model, image_size, out_dir = build_backbone(args)
    cli.check_output_dir(out_dir)
    return model, image_size, out_dir


def main(args):
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, image_size, out_dir = prepare(args)
    model.to(device)
    dtype = runtime.inference_dtype(device)
    (train_f, train_l), (test_f, test_l), classes = embed_splits(model, args.data_path, image_size, device,
                                                                 args.batch_size_per_gpu, args.num_workers, dtype)
    n = len(train_l)  # k is at most the memory bank's size: a larger one is reported as what it is
    results = {min(k, n): knn_classifier(train_f, train_l, test_f, test_l, k, args.temperature, classes)
               for k in args.nb_knn}
    if max(args.nb_knn) > n:
        print(f"note: --nb_knn {' '.join(str(k) for k in args.nb_knn if k > n)} capped at the {n} training images: "
              f"k = {n}")
    what = cli.source_name(args)
    print(f"{'pixels' if args.raw_pixels else f'{args.arch}/{args.patch_size}'} ({what}) on {args.data_path} "
          f"at {image_size} px")
    for k, (top1, top5) in results.items():
        print(f"  {k:>3}-NN: top-1 {top1:6.2f}%  top-5 {top5:6.2f}%")
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt.save_json({"source": str(what), "arch": args.arch, "patch_size": args.patch_size, "data_path": args.data_path,
                    "image_size": image_size, "temperature": args.temperature,
                    "knn": {str(k): {"top1": a, "top5": b} for k, (a, b) in results.items()}},
                   out_dir / cli.results_name(args, "knn"))
    if 20 in args.nb_knn:
        print(f"k-NN top-1 (k={min(20, n)}): {results[min(20, n)][0]:.2f}%")


if __name__ == "__main__":
    sys.exit(cli.run(main, get_args_parser().parse_args))
