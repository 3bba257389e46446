"""Datasets: the types every task shares and `build_task`, the one way train.py and evaluate.py read data.

A classification task (TaskData) is a train set, an ID test set and the OOD sets of the WiSE-FT
protocol that R-Adapter follows (Sec. 4.1): each OOD set (EvalSet) may have its own label space,
and `project_logits` maps the task's [N, C] logits onto it. A retrieval task (RetrievalData) is
one training row per caption and the test sets of Sec. 4 (COCO 5K, Flickr30k 1K).

    imagenet.py   ImageNet, its five shifts, any ImageFolder tree (their layouts; imagenet_classes.py: the tables)
    coop.py       the 11 datasets of CoOp's few-shot / base-to-novel benchmark (their layouts)
    retrieval.py  COCO and Flickr30k on Karpathy's splits (their layouts)
    toy.py        the offline toy world's task (toy_world.py renders it; toy_clip.py: its CLIP)

Images that fail to decode come back as None with one warning per file (or raise with strict);
`collate_skip` drops them when batching. A missing or malformed folder or file raises DataError
naming it.
"""

import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, default_collate


class DataError(ValueError):
    """A data tree or file that is not what the task expects; the message names the path."""


@dataclass
class EvalSet:
    name: str  # 'imagenet', 'imagenet-v2', ..., or a user name
    dataset: Dataset  # (image, label), label in THIS set's classes
    class_index: Optional[torch.Tensor] = None  # [C_set] long: task class of each set class
    class_groups: Optional[list[list[int]]] = None  # set class c = max over task classes groups[c]

    def __post_init__(self):
        if self.class_index is not None and self.class_groups is not None:
            raise ValueError(f"{self.name}: give class_index or class_groups, not both")

    def project_logits(self, logits):
        """[N, C_task] -> [N, C_set]; identity when the set uses the task's classes."""
        if self.class_index is not None:
            return logits[:, self.class_index.to(logits.device)]
        if self.class_groups is not None:
            return torch.stack([logits[:, g].amax(dim=1) for g in self.class_groups], dim=1)
        return logits


@dataclass
class TaskData:
    classnames: list[str]  # task class names, index = label
    templates: list[str]  # prompt format strings with one '{}'
    train: Optional[Dataset]  # (image, label); None when there is no train folder
    test: EvalSet  # the ID evaluation set
    ood: list[EvalSet]  # the OOD sets that were found


class ImageList(Dataset):
    """(path, label) pairs -> (transform(RGB PIL image), label); an undecodable file -> None."""

    def __init__(self, samples: list[tuple[str, int]], transform: Optional[Callable] = None, strict: bool = False):
        self.samples, self.transform, self.strict = samples, transform, strict
        self._warned: set[str] = set()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            with Image.open(path) as f:
                image = f.convert("RGB")  # decodes now; a truncated file raises OSError here
        except (OSError, SyntaxError) as e:  # PIL's "cannot decode this file" errors
            if self.strict:
                raise DataError(f"{path}: cannot read image ({e})") from e
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn(f"skipping unreadable image {path}: {e}", stacklevel=2)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def collate_skip(batch):
    """DataLoader collate_fn: drop None items -> (images [B, 3, H, W], labels [B], n_bad)."""
    good = [item for item in batch if item is not None]
    if not good:
        return torch.empty(0, 3, 0, 0), torch.empty(0, dtype=torch.long), len(batch)
    images, labels = default_collate(good)
    return images, labels, len(batch) - len(good)


# ---------------------------------------------------- a run's data order
def seed_of(*parts):
    """A 63-bit seed derived from parts: randomness depends on (seed, step, ...), not on history."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class StepSampler(Sampler):
    """Yields (epoch, index) for this rank's share of each global batch, from `start_step` on; the
    order of epoch e is a permutation seeded by (seed, e), so a resumed run sees the same samples."""

    def __init__(self, n, batch_size, seed, rank=0, world=1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.steps_per_epoch = n // batch_size
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed_of(self.seed, self.epoch)))
        share = self.batch_size // self.world
        for step in range(self.start_step, self.steps_per_epoch):
            batch = order[step * self.batch_size : (step + 1) * self.batch_size]
            for i in batch[self.rank * share : (self.rank + 1) * share].tolist():
                yield self.epoch, i

    def __len__(self):
        return (self.steps_per_epoch - self.start_step) * (self.batch_size // self.world)


class SeededAugment(Dataset):
    """Seeds the augmentation of sample i in epoch e with (seed, e, i): identical in any worker."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        # the CPU generator only, restored after: with --workers 0 this runs in the training process, whose
        # (seed, step, rank) random state (templates, adapter dropping) must not depend on the samples loaded
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed_of(self.seed, epoch, i))
            return self.dataset[i]


def names():
    """Every --data name: imagenet, folder, the toy tasks, the retrieval sets and the CoOp datasets."""
    from data import coop, retrieval, toy

    return ("imagenet", "folder", *toy.NAMES, *retrieval.DATASETS, *coop.DATASETS)


def check_root(name, root):
    """The checks of build_task that cost nothing, for entry points to make before any download."""
    from data import toy

    if name in toy.NAMES:
        return
    if root is None:
        raise DataError(f"--data {name} needs --data-root DIR")
    if not os.path.isdir(root):
        raise DataError(f"--data-root {root}: folder not found")


def build_task(
    name,
    root=None,
    train_transform=None,
    eval_transform=None,
    *,
    context_length=77,
    shots=None,
    seed=0,
    ood=None,
    strict=False,
    classnames=None,
    flip=False,
):
    """TaskData (classification) or RetrievalData (coco, flickr30k) of --data `name` under `root`.

    shots: K training images per class (seeded). ood: {set name: directory}, extra or relocated
    evaluation sets. classnames: a JSON file {folder: name} for --data folder. flip: the toy world's
    random horizontal flip (its images are tensors already; every other task flips in train_transform)."""
    from data import coop, imagenet, retrieval, toy

    if shots is not None and shots < 1:
        raise DataError(f"--shots {shots}: expected a positive number of images per class")
    if name in toy.NAMES:
        return toy.task(shots, flip=flip, name=name)
    check_root(name, root)
    if name in retrieval.DATASETS:
        if shots is not None:
            raise DataError(f"--shots: --data {name} trains on every caption (no classes to draw K shots of)")
        return retrieval.build(name, root, train_transform, eval_transform, context_length, ood=ood, strict=strict)
    if name in coop.DATASETS:
        if ood:
            raise DataError(f"--ood: --data {name} evaluates its own test set only")
        return coop.build(name, root, train_transform, eval_transform, shots=shots, seed=seed, strict=strict)
    if name in ("imagenet", "folder"):
        return imagenet.build(
            name,
            root,
            train_transform,
            eval_transform,
            shots=shots,
            seed=seed,
            ood=ood,
            strict=strict,
            classnames=classnames,
        )
    raise DataError(f"--data {name}: expected one of {', '.join(names())}")
