"""ImageNet and its five distribution shifts (R-Adapter Sec. 4.1, the WiSE-FT protocol), and any
ImageFolder tree.

Each OOD set has its own label space; EvalSet.project_logits maps the task's [N, 1000] logits onto it:

    set              classes  labels                               logits scored
    imagenet (val)   1000     sorted-wnid index                    all 1000
    imagenet-v2      1000     folder name '0'..'999' (an integer)  all 1000
    imagenet-sketch  1000     sorted-wnid index                    all 1000
    imagenet-r       200      index into its 200 sorted wnids      those 200 columns (class_index)
    imagenet-a       200      index into its 200 sorted wnids      those 200 columns (class_index)
    objectnet        113      index into its 113 sorted folders    max over each class's mapped
                                                                   ImageNet columns (class_groups)

--data imagenet --data-root ROOT. Each shift is looked for under ROOT by the folder its archive
unpacks to (--ood NAME=DIR points one elsewhere); an absent one is skipped with one printed line:

    ROOT/train/<wnid>/*.JPEG                     ImageNet train (optional: zero-shot needs val only)
    ROOT/val/<wnid>/*.JPEG                       ImageNet val
    ROOT/imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg
    ROOT/sketch/<wnid>/*                         ImageNet-Sketch
    ROOT/imagenet-r/<wnid>/*                     ImageNet-R, 200 wnids
    ROOT/imagenet-a/<wnid>/*                     ImageNet-A, 200 wnids
    ROOT/objectnet-1.0/images/<folder>/*.png     ObjectNet (313 folders; 113 are scored, after a 2 px
    ROOT/objectnet-1.0/mappings/                 border crop) and the mapping files it ships with

Classes are the sorted wnids, named with open_clip's IMAGENET_CLASSNAMES and prompted with its 80
OpenAI templates. With all 1000 classes every shift is checked for the classes it must hold. With
fewer wnids (small test trees) those are the task classes and each shift keeps what maps onto them.

--data folder --data-root ROOT: ROOT/train/<class>/* (optional), ROOT/val/<class>/* (or test/), and
--ood NAME=DIR sets with the same class folders. Names are the folders with '_' read as a space, or
--classnames FILE (JSON {folder: name}); prompts are FOLDER_TEMPLATES.
"""

import json
import os
import random

import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import Compose

from data import DataError, EvalSet, ImageList, TaskData
from data.imagenet_classes import IMAGENET_A_INDICES, IMAGENET_R_INDICES, IMAGENET_WNIDS

# where each OOD set unpacks under the ImageNet root (WiSE-FT's datasets.md)
OOD_DIRS = {
    "imagenet-v2": "imagenetv2-matched-frequency-format-val",
    "imagenet-r": "imagenet-r",
    "imagenet-a": "imagenet-a",
    "imagenet-sketch": "sketch",
    "objectnet": "objectnet-1.0",
}

# prompts for a generic folder task: neutral wording, nothing domain-specific
FOLDER_TEMPLATES = [
    "a photo of a {}.",
    "a photo of the {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
]


def crop_border(image: Image.Image, px: int = 2) -> Image.Image:
    """Cut px pixels off every side; WiSE-FT does this to ObjectNet images before evaluation."""
    w, h = image.size
    return image.crop((px, px, w - px, h - px))


def build(
    name,
    root,
    train_transform=None,
    eval_transform=None,
    *,
    shots=None,
    seed=0,
    ood=None,
    strict=False,
    classnames=None,
):
    """The train set, ID test set and OOD sets of --data imagenet or folder under root.

    shots: keep K training images per class (seeded; independent of directory listing order).
    ood: {set name: directory}. For 'imagenet' it overrides the default locations of the five
        shifts (OOD_DIRS) or adds a user set laid out as <wnid>/*; for 'folder' it lists the
        extra eval sets.
    classnames: a list, or a JSON file {folder: name}, overriding the class names.
    """
    train_dir, eval_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if name == "folder" and not os.path.isdir(eval_dir):
        eval_dir = os.path.join(root, "test")
    if not os.path.isdir(eval_dir):
        raise DataError(f"{eval_dir}: evaluation folder not found")
    has_train = os.path.isdir(train_dir)
    if shots is not None and not has_train:
        raise DataError(f"{train_dir}: shots={shots} needs a train folder")
    classes = _class_folders(train_dir if has_train else eval_dir)  # task classes, index = label
    if has_train:
        _check_same_classes(eval_dir, classes, train_dir)

    if name == "imagenet":
        unknown = [c for c in classes if c not in _WNID_INDEX]
        if unknown:
            raise DataError(
                f"{os.path.join(train_dir if has_train else eval_dir, unknown[0])}: not an ImageNet-1k wnid"
            )
        default_names = [IMAGENET_CLASSNAMES[_WNID_INDEX[w]] for w in classes]
        templates = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
        test = EvalSet("imagenet", _folder_set(eval_dir, classes, eval_transform, strict))
        ood_sets = _imagenet_ood(root, classes, ood or {}, eval_transform, strict)
    else:
        default_names = [c.replace("_", " ") for c in classes]
        templates = list(FOLDER_TEMPLATES)
        test = EvalSet(os.path.basename(os.path.normpath(root)), _folder_set(eval_dir, classes, eval_transform, strict))
        ood_sets = []
        for set_name, path in (ood or {}).items():
            if _present(set_name, path):
                _check_same_classes(path, classes, train_dir if has_train else eval_dir)
                dataset = _folder_set(path, classes, eval_transform, strict)
                ood_sets.append(EvalSet(set_name, dataset))

    train = None
    if has_train:
        samples = _scan(train_dir, {c: i for i, c in enumerate(classes)})
        if shots is not None:
            samples = few_shot(samples, train_dir, classes, shots, seed)
        train = ImageList(samples, train_transform, strict)
    else:
        print(f"data: no train folder at {train_dir}; train=None")
    return TaskData(_names(classes, classnames, default_names), templates, train, test, ood_sets)


# ---------------------------------------------------------------------------- ImageNet shifts


def _imagenet_ood(root, classes, ood, transform, strict):
    task = {w: i for i, w in enumerate(classes)}  # wnid -> task label
    full = len(classes) == 1000
    expected = {  # wnid folders each set must have when the task is full ImageNet
        "imagenet-sketch": set(IMAGENET_WNIDS),
        "imagenet-r": {IMAGENET_WNIDS[i] for i in IMAGENET_R_INDICES},
        "imagenet-a": {IMAGENET_WNIDS[i] for i in IMAGENET_A_INDICES},
    }
    paths = {n: os.path.join(root, d) for n, d in OOD_DIRS.items()} | ood
    sets = []
    for name, path in paths.items():
        if not _present(name, path):
            continue
        if name == "imagenet-v2":
            sets.append(_imagenet_v2(path, len(classes), full, transform, strict))
        elif name == "objectnet":
            sets.append(_objectnet(path, task, full, transform, strict))
        else:
            sets.append(_wnid_set(name, path, task, expected.get(name) if full else None, transform, strict))
    return sets


def _wnid_set(name, path, task, expected, transform, strict):
    """A <wnid>/* set (Sketch, R, A, or a user set). Labels index its own sorted wnids; a set with
    fewer classes than the task gets class_index to pick its columns."""
    wnids = _class_folders(path)
    outside = [w for w in wnids if w not in task]
    if outside:
        raise DataError(
            f"{os.path.join(path, outside[0])}: {name} folder is not one of the task's {len(task)} ImageNet wnids"
        )
    if expected is not None and set(wnids) != expected:
        raise DataError(
            f"{path}: {name} expected its {len(expected)} wnid folders, found {len(wnids)} ({_diff(wnids, expected)})"
        )
    dataset = _folder_set(path, wnids, transform, strict)
    if len(wnids) == len(task):
        return EvalSet(name, dataset)
    return EvalSet(name, dataset, class_index=torch.tensor([task[w] for w in wnids]))


def _imagenet_v2(path, n_classes, full, transform, strict):
    # Folders are named by class index. Read them as integers: a plain ImageFolder sorts
    # them as strings ('0', '1', '10', '100', ...) and mislabels 990 of the 1000 classes.
    folders = _class_folders(path)
    bad = [f for f in folders if not (f.isdigit() and f == str(int(f)) and int(f) < n_classes)]
    if bad:
        raise DataError(f"{os.path.join(path, bad[0])}: imagenet-v2 folders must be class indices 0..{n_classes - 1}")
    if full and len(folders) != 1000:
        raise DataError(f"{path}: imagenet-v2 expected 1000 class folders 0..999, found {len(folders)}")
    return EvalSet("imagenet-v2", ImageList(_scan(path, {f: int(f) for f in folders}), transform, strict))


def _objectnet(path, task, full, transform, strict):
    """ObjectNet's classes that overlap ImageNet, read from the mapping files it ships with.

    folder_to_objectnet_label.json  {'alarm_clock': 'Alarm clock', ...}
    objectnet_to_imagenet_1k.json   {'Alarm clock': 'analog clock; digital clock', ...}
                                    (ImageNet classes by WordNet name, '; '-separated)
    imagenet_to_label_2012_v2       1000 lines, the WordNet name of each ILSVRC-2012 class id
    pytorch_to_imagenet_2012_id.json {'0': 355, ...}: sorted-wnid index -> line of the file above
    """
    mappings, images = os.path.join(path, "mappings"), os.path.join(path, "images")
    if not os.path.isdir(images):
        raise DataError(f"{images}: objectnet images folder not found")
    folder_to_label = _read_mapping(mappings, "folder_to_objectnet_label.json")
    label_to_names = _read_mapping(mappings, "objectnet_to_imagenet_1k.json")
    index_to_line = _read_mapping(mappings, "pytorch_to_imagenet_2012_id.json")
    lines = _read_mapping(mappings, "imagenet_to_label_2012_v2")
    if len(index_to_line) != 1000 or len(lines) != 1000:
        raise DataError(
            f"{mappings}: expected 1000 ImageNet classes in "
            "pytorch_to_imagenet_2012_id.json and imagenet_to_label_2012_v2"
        )
    name_to_indices = {}  # WordNet name -> sorted-wnid indices ('crane' names two classes)
    for index, line in index_to_line.items():
        name_to_indices.setdefault(lines[line], []).append(int(index))
    label_to_folder = {label: folder for folder, label in folder_to_label.items()}
    if full and len(label_to_names) != 113:
        raise DataError(
            f"{mappings}/objectnet_to_imagenet_1k.json: expected the 113 ObjectNet "
            f"classes that overlap ImageNet, found {len(label_to_names)}"
        )

    groups = {}  # ObjectNet folder -> task labels of its ImageNet classes
    for label, names in label_to_names.items():
        if label not in label_to_folder:
            raise DataError(f"{mappings}/folder_to_objectnet_label.json: no folder for ObjectNet class {label!r}")
        group = []
        for n in names.split("; "):
            indices = name_to_indices.get(n, [])
            if len(indices) != 1:
                raise DataError(
                    f"{mappings}/objectnet_to_imagenet_1k.json: ImageNet name {n!r} "
                    f"matches {len(indices)} lines of imagenet_to_label_2012_v2, "
                    "expected 1"
                )
            wnid = IMAGENET_WNIDS[indices[0]]
            if wnid in task:  # always true with the full 1000 classes
                group.append(task[wnid])
        if group:
            groups[label_to_folder[label]] = group
    if not groups:
        raise DataError(f"{mappings}: no ObjectNet class maps to a task class")
    folders = sorted(groups)  # set labels follow sorted folder names, as in WiSE-FT
    crop_then_transform = Compose([crop_border] + ([transform] if transform is not None else []))
    dataset = ImageList(_scan(images, {f: i for i, f in enumerate(folders)}), crop_then_transform, strict)
    return EvalSet("objectnet", dataset, class_groups=[groups[f] for f in folders])


def _read_mapping(mappings, filename):
    path = os.path.join(mappings, filename)
    if not os.path.isfile(path):
        raise DataError(f"{path}: ObjectNet mapping file missing (it ships in objectnet-1.0/mappings/)")
    with open(path) as f:
        if filename.endswith(".json"):
            return json.load(f)
        return [line.strip() for line in f.read().splitlines()]


# ---------------------------------------------------------------------------- folder helpers


def _present(name, path):
    if os.path.isdir(path):
        return True
    print(f"data: {name} not found at {path}; skipped")
    return False


def _class_folders(path):
    """Sorted names of the class sub-folders of path."""
    folders = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise DataError(f"{path}: no class folders")
    return folders


def _check_same_classes(path, classes, reference):
    found = _class_folders(path)
    if found != classes:
        raise DataError(f"{path}: class folders differ from {reference} ({_diff(found, classes)})")


def _diff(found, expected):
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    return f"{len(missing)} missing {missing[:5]}, {len(extra)} unexpected {extra[:5]}"


def _images(folder):
    files = sorted(
        os.path.join(d, f)
        for d, _, fs in os.walk(folder, followlinks=True)
        for f in fs
        if has_file_allowed_extension(f, IMG_EXTENSIONS)
    )
    if not files:
        raise DataError(f"{folder}: class folder empty or missing (no {'/'.join(IMG_EXTENSIONS)} files)")
    return files


def _scan(root, labels):
    """labels: {class folder: label} -> [(path, label)] over root/<folder>/**."""
    return [(p, label) for folder, label in labels.items() for p in _images(os.path.join(root, folder))]


def _folder_set(path, classes, transform, strict):
    return ImageList(_scan(path, {c: i for i, c in enumerate(classes)}), transform, strict)


def few_shot(samples, train_dir, classes, shots, seed):
    """K images per class. The draw depends only on (seed, class folder, that class's file
    paths), so it survives listing order and the addition of other classes."""
    by_label = {}
    for path, label in samples:
        by_label.setdefault(label, []).append(path)
    subset = []
    for label, folder in enumerate(classes):
        paths = sorted(by_label[label])
        if len(paths) < shots:
            raise DataError(f"{os.path.join(train_dir, folder)}: {len(paths)} images, fewer than shots={shots}")
        rng = random.Random(f"{seed}/{folder}")  # str seeds hash with sha512: stable across runs
        subset += [(p, label) for p in sorted(rng.sample(paths, shots))]
    return subset


def _names(classes, classnames, default):
    if classnames is None:
        return default
    if isinstance(classnames, (str, os.PathLike)):
        try:
            with open(classnames) as f:
                mapping = json.load(f)  # {folder: name}
        except (OSError, ValueError) as e:
            raise DataError(f"--classnames {classnames}: expected a JSON file {{folder: class name}} ({e})") from e
        missing = [c for c in classes if c not in mapping]
        if missing:
            raise DataError(f"{classnames}: no name for class folder {missing[0]!r}")
        return [mapping[c] for c in classes]
    if len(classnames) != len(classes):
        raise DataError(f"classnames has {len(classnames)} entries for {len(classes)} classes")
    return list(classnames)


_WNID_INDEX = {w: i for i, w in enumerate(IMAGENET_WNIDS)}
