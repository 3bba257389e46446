"""The CoOp benchmark: 11 classification datasets, K-shot training and CoCoOp's base-to-novel split.

R-Adapter (ECCV 2024, Sec. 4) and CLIPFit (EMNLP 2024) both report the
base-to-novel protocol of CoCoOp (Zhou et al., CVPR 2022) on the 11 datasets of CoOp (Zhou et al.,
IJCV 2022) with 16 training images per class; CLIPFit also reports K-shot accuracy on all classes.

Base-to-novel. The classes, sorted by label, are cut in two: base = the first ceil(n/2) labels,
new = the others, relabelled from 0. The model trains on the base classes only (their K-shot
subset); then the base half of the test set is scored with a classifier over the base classes only
and the new half with one over the new classes only, and the summary is the harmonic mean
HM = 2 * base * new / (base + new). The K-shot draw is per class (imagenet.few_shot), so drawing it
before the cut, as CoOp does, or after gives the same images.

Layouts (CoOp's DATASETS.md): every dataset in its own folder under one root, --data-root. The
split_zhou_*.json files are CoOp's fixed train/val/test splits, linked from that page
(github.com/KaiyangZhou/CoOp); the images come from each dataset's own site (archive named on the
right).

    ROOT/
    |-- caltech-101/                          --data caltech101
    |   |-- 101_ObjectCategories/<class>/*.jpg    101_ObjectCategories.tar.gz
    |   `-- split_zhou_Caltech101.json
    |-- oxford_pets/                          --data oxford_pets
    |   |-- images/*.jpg                          images.tar.gz (Oxford-IIIT Pet)
    |   `-- split_zhou_OxfordPets.json
    |-- stanford_cars/                        --data stanford_cars
    |   |-- cars_train/*.jpg, cars_test/*.jpg     Stanford Cars train and test images
    |   `-- split_zhou_StanfordCars.json          (its paths start with cars_train/ or cars_test/)
    |-- oxford_flowers/                       --data oxford_flowers
    |   |-- jpg/*.jpg                             102flowers.tgz
    |   `-- split_zhou_OxfordFlowers.json
    |-- food-101/                             --data food101
    |   |-- images/<class>/*.jpg                  food-101.tar.gz
    |   `-- split_zhou_Food101.json
    |-- fgvc_aircraft/                        --data fgvc_aircraft (no split file)
    |   |-- images/*.jpg                          fgvc-aircraft-2013b.tar.gz: the files of its data/
    |   |-- variants.txt                          one variant per line; label = line index
    |   `-- images_variant_{train,val,test}.txt   '<image id> <variant>' per line: images/<id>.jpg
    |-- sun397/                               --data sun397
    |   |-- SUN397/<letter>/<class>/.../*.jpg     SUN397.tar.gz
    |   `-- split_zhou_SUN397.json
    |-- dtd/                                  --data dtd
    |   |-- images/<class>/*.jpg                  dtd-r1.0.1.tar.gz
    |   `-- split_zhou_DescribableTextures.json
    |-- eurosat/                              --data eurosat
    |   |-- 2750/<class>/*.jpg                    EuroSAT.zip (RGB)
    |   `-- split_zhou_EuroSAT.json
    |-- ucf101/                               --data ucf101
    |   |-- UCF-101-midframes/<class>/*.jpg       UCF-101-midframes.zip (CoOp's middle frames)
    |   `-- split_zhou_UCF101.json
    `-- imagenet/                             --data imagenet --data-root ROOT/imagenet/images
        |-- images/train/<wnid>/*.JPEG            ImageNet train, val: imagenet.py's layout
        |-- images/val/<wnid>/*.JPEG
        `-- classnames.txt                        not read: CLIP's names, which imagenet.py uses too

A split file is {"train": [[image path relative to the image folder, label, class name], ...],
"val": [...], "test": [...]}. We read train and test (val is CoOp's model selection; we evaluate
the last epoch). Class names are the split file's (FGVC: variants.txt) with '_' read as a space,
as CoOp does when it fills its prompts ('Apply_Eye_Makeup' -> 'Apply Eye Makeup'). The prompt is
CoOp's one hand-written template per dataset (DATASETS[name].template); ImageNet keeps its 80
OpenAI templates. A missing or malformed folder or file is a DataError naming it (and, when
missing, what to download).
"""

import json
import math
import os
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from data import DataError, EvalSet, ImageList, TaskData
from data.imagenet import few_shot


class Layout(NamedTuple):
    folder: str  # under the root
    images: str  # image folder inside it ('' = the folder itself); split paths are relative to it
    split: str  # CoOp's split file, or the train list (FGVC-Aircraft)
    template: str  # CoOp's hand-written prompt


# --data name (CoOp's config names) -> layout; ImageNet goes through imagenet.py (see above).
DATASETS = {
    "caltech101": Layout("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", "a photo of a {}."),
    "oxford_pets": Layout("oxford_pets", "images", "split_zhou_OxfordPets.json", "a photo of a {}, a type of pet."),
    "stanford_cars": Layout("stanford_cars", "", "split_zhou_StanfordCars.json", "a photo of a {}."),
    "oxford_flowers": Layout(
        "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", "a photo of a {}, a type of flower."
    ),
    "food101": Layout("food-101", "images", "split_zhou_Food101.json", "a photo of {}, a type of food."),
    "fgvc_aircraft": Layout(
        "fgvc_aircraft", "images", "images_variant_train.txt", "a photo of a {}, a type of aircraft."
    ),
    "sun397": Layout("sun397", "SUN397", "split_zhou_SUN397.json", "a photo of a {}."),
    "dtd": Layout("dtd", "images", "split_zhou_DescribableTextures.json", "{} texture."),
    "eurosat": Layout("eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {}."),
    "ucf101": Layout("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {}."),
}
BENCHMARK = ("imagenet", *DATASETS)  # the 11 datasets, in the papers' table order


def build(name, root, train_transform=None, eval_transform=None, *, shots=None, seed=0, strict=False):
    """Train (K-shot when shots is given, seeded) and test set of CoOp dataset `name` under root."""
    if name not in DATASETS:
        raise DataError(
            f"unknown CoOp dataset {name!r}: expected one of {', '.join(DATASETS)} (ImageNet: --data imagenet)"
        )
    layout = DATASETS[name]
    folder = os.path.join(root, layout.folder)
    hint = (
        f"--data {name} expects CoOp's layout under {root}: {layout.folder}/{layout.images or '.'} "
        f"(the images) and {layout.folder}/{layout.split} (see data/coop.py for the downloads)"
    )
    image_dir = os.path.join(folder, layout.images)
    if not os.path.isdir(image_dir):
        raise DataError(f"{image_dir}: image folder not found; {hint}")
    if name == "fgvc_aircraft":
        splits, classnames = _read_fgvc_aircraft(folder, hint)
        listed = {part: os.path.join(folder, f"images_variant_{part}.txt") for part in splits}
    else:
        splits, classnames = _read_split(os.path.join(folder, layout.split), image_dir, hint)
        listed = dict.fromkeys(splits, os.path.join(folder, layout.split))
    for part, samples in splits.items():
        if not samples:
            raise DataError(f"{listed[part]}: no {part} images listed; {hint}")
    missing = [p for samples in splits.values() for p, _ in samples if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{image_dir}: {len(missing)} listed images are missing, e.g. {missing[0]}; {hint}")
    train = splits["train"]
    if shots is not None:
        train = few_shot(train, os.path.join(folder, layout.split), classnames, shots, seed)
    return TaskData(
        [c.replace("_", " ") for c in classnames],
        [layout.template],
        ImageList(train, train_transform, strict),
        EvalSet(name, ImageList(splits["test"], eval_transform, strict)),
        [],
    )


def _read_split(path, image_dir, hint):
    """CoOp's split file -> ({'train': [(image path, label)], 'test': [...]}, class names by label)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: split file not found; {hint}")
    try:
        with open(path) as f:
            split = json.load(f)
        names, splits = {}, {}
        for part in ("train", "test"):
            splits[part] = []
            for impath, label, classname in split[part]:
                if names.setdefault(label, classname) != classname:
                    raise DataError(f"label {label} is named both {names[label]!r} and {classname!r}")
                splits[part].append((os.path.join(image_dir, impath), label))
        if sorted(names) != list(range(len(names))):
            raise DataError(f"labels must be 0..{len(names) - 1}, found {sorted(names)[:5]}...")
    except (ValueError, KeyError, TypeError) as e:  # bad JSON, missing part, wrong entry shape
        raise DataError(f"{path}: not a CoOp split file ({type(e).__name__}: {e})") from e
    return splits, [names[i] for i in range(len(names))]


def _read_fgvc_aircraft(folder, hint):
    """FGVC-Aircraft's own text files -> ({'train': [(image path, label)], 'test': [...]}, variants)."""
    variants = _lines(os.path.join(folder, "variants.txt"), hint)
    labels = {v: i for i, v in enumerate(variants)}
    splits = {}
    for part in ("train", "test"):
        path = os.path.join(folder, f"images_variant_{part}.txt")
        splits[part] = []
        for n, line in enumerate(_lines(path, hint), 1):
            image_id, _, variant = line.partition(" ")
            if variant not in labels:
                raise DataError(f"{path} line {n}: variant {variant!r} is not in variants.txt")
            splits[part].append((os.path.join(folder, "images", image_id + ".jpg"), labels[variant]))
    return splits, variants


def _lines(path, hint):
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found; {hint}")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


class ClassRange(Dataset):
    """The samples of a labelled dataset (one with a .labels list) whose label is in `labels` (a
    range), relabelled from 0."""

    def __init__(self, dataset, labels: range):
        self.dataset, self.start = dataset, labels.start
        self.indices = [i for i, y in enumerate(dataset.labels) if y in labels]
        self.labels = [dataset.labels[i] - labels.start for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        image, label = self.dataset[self.indices[i]]
        return image, label - self.start


def base_new(task: TaskData) -> tuple[TaskData, TaskData]:
    """CoCoOp's split of a task (read from files, or the toy world's) -> (train task, eval task).

    train task: the base classes (labels 0..m-1, m = ceil(n/2)) and their training images.
    eval task: all n classes; test = 'base' (base test images, scored on columns 0..m-1), ood =
    ['new'] (the other test images relabelled from 0, scored on columns m..n-1), so
    each half is scored among its own classes only. OOD sets are dropped."""
    n = len(task.classnames)
    if n < 2:
        raise DataError(f"base-to-novel needs at least 2 classes, the task has {n}")
    labelled = isinstance(task.test.dataset, ImageList) or hasattr(task.test.dataset, "labels")
    if not labelled or task.test.class_index is not None:
        raise DataError(f"base-to-novel needs a task whose images list their labels, got test set {task.test.name!r}")
    m = math.ceil(n / 2)
    base, new = range(m), range(m, n)

    def keep(dataset, labels):  # the samples of `labels`, relabelled from 0
        if not isinstance(dataset, ImageList):
            return ClassRange(dataset, labels)
        return ImageList(
            [(p, y - labels.start) for p, y in dataset.samples if y in labels], dataset.transform, dataset.strict
        )

    train = None if task.train is None else keep(task.train, base)
    base_test = keep(task.test.dataset, base)
    train_task = TaskData(task.classnames[:m], task.templates, train, EvalSet("base", base_test), [])
    eval_task = TaskData(
        task.classnames,
        task.templates,
        None,
        EvalSet("base", base_test, class_index=torch.arange(m)),
        [EvalSet("new", keep(task.test.dataset, new), class_index=torch.arange(m, n))],
    )
    return train_task, eval_task
