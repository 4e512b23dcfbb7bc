"""The training loader (training_loader): shuffled full batches of multi-crop samples, seeded per (seed, epoch,
image), finished on the training device; the photometric half of the split recipe (multicrop_fast.py) runs
there, batched (in the workers on a CPU-only run). The CPU time the workers spend is counted, for
`train.py --benchmark_data`.
"""
import itertools
import time

import torch

from runtime import ignore_stop_signals


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler whose indices also carry the epoch (epoch * n + i), so that each sample's
    crops are drawn from a generator seeded by (seed, epoch, index): the same crops whatever the
    number of workers, and a resumed run sees exactly what an uninterrupted one would."""

    skip = 0  # indices of this epoch already consumed before a resume

    def __iter__(self):
        n = len(self.dataset)
        return (self.epoch * n + i for i in itertools.islice(super().__iter__(), self.skip, None))


class SeededCrops(torch.utils.data.Dataset):
    """Item `key` = epoch * n + i: image i through the transform, with torch's generator seeded by (seed,
    epoch, i). Returns (crops, params, target, cpu): params are the photometric draws of the split recipe
    (multicrop_fast.DataAugmentationDINOSplit; {} for DataAugmentationDINO, which returns finished crops),
    cpu the seconds of CPU this item took in its process (measured, for --benchmark_data)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        t0 = time.process_time()
        epoch, i = divmod(key, len(self.dataset))
        with torch.random.fork_rng(devices=[]):  # leave the caller's generator as it was
            # a tuple of ints hashes the same every run; the CPU generator only (torch.manual_seed would also
            # seed CUDA's, lazily)
            torch.default_generator.manual_seed(hash((self.seed, epoch, i)) % 2 ** 62)
            sample, target = self.dataset[i]
        crops, params = sample if isinstance(sample, tuple) else (sample, {})
        return crops, params, target, time.process_time() - t0


class CollateCrops:
    """Batches of SeededCrops items, made in the worker. With `augment` (a CPU-only run, where the training
    device is the CPU) the batched photometric half runs here too, beside the training process, not in it."""

    def __init__(self, augment=None):
        self.augment = augment

    def __call__(self, items):
        crops, params, targets, cpu = torch.utils.data.default_collate(items)  # crops: V tensors (B, 3, h, w)
        batched, t0 = 0.0, time.process_time()
        if params and self.augment is not None:
            crops, params = self.augment(crops, params), {}
            batched = time.process_time() - t0
        return crops, params, targets, (float(cpu.sum()), batched)  # CPU seconds: per image, batched


class DeviceBatches:
    """The training loader as the loop sees it: (crops, targets) with the crops finished and on `device`;
    uint8 crops still carrying their photometric draws are augmented there, batched. Counts the images of
    the batches it handed out and the CPU seconds the workers spent on them: per image (decode, crops, and
    the whole recipe in reference mode) and batched (the photometric half, when it runs in the workers)."""

    def __init__(self, loader, device, augment):
        self.loader, self.sampler, self.device, self.augment = loader, loader.sampler, device, augment
        self.images, self.cpu_seconds, self.cpu_seconds_batched = 0, 0.0, 0.0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for crops, params, targets, cpu in self.loader:
            self.images += len(targets)
            self.cpu_seconds += cpu[0]
            self.cpu_seconds_batched += cpu[1]
            crops = [c.to(self.device, non_blocking=True) for c in crops]
            yield (self.augment(crops, params) if params else crops), targets



def batch_seconds(dataset, batch_size, seed, augment=None):
    """(seconds, crops): one batch of crops made and finished in this process, as a worker would."""
    t0 = time.perf_counter()
    crops = CollateCrops(augment)([SeededCrops(dataset, seed)[i] for i in range(batch_size)])[0]
    return time.perf_counter() - t0, crops


def training_loader(dataset, batch_size, num_workers, seed, rank=0, world=1, device=torch.device("cpu"),
                    augment=None):
    """Shuffled full batches of multi-crop samples, seeded per (seed, epoch, image), finished on `device`;
    set_epoch and skip go through `loader.sampler`. augment: the batched photometric half for samples of
    the split recipe; it runs in the workers when the device is the CPU, on the device otherwise."""
    sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    on_cpu = device.type == "cpu"
    loader = torch.utils.data.DataLoader(
        SeededCrops(dataset, seed), sampler=sampler, batch_size=batch_size, num_workers=num_workers,
        collate_fn=CollateCrops(augment if on_cpu else None), pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None,
        worker_init_fn=ignore_stop_signals)
    return DeviceBatches(loader, device, augment)
