"""Image-text retrieval: COCO and Flickr30k on Karpathy's splits (R-Adapter Sec. 4).

The paper fine-tunes CLIP on COCO captions and reports recall R@1/5/10 in both directions on
the COCO 5K test set and on the Flickr30k 1K test set. Training has one row per caption (COCO:
Karpathy train + restval, 113,287 images, ~566K captions); a row's label is its image's id, so
in MPM-NCE (Sec. 3.4) the other captions of the same image in the batch are positives too.
Test sets keep the first 5 captions of each image (5,000 images / 25,000 captions for COCO,
1,000 / 5,000 for Flickr30k).

Layouts (Karpathy's caption_datasets.zip gives the two JSON files):

    --data coco --data-root ROOT
        ROOT/dataset_coco.json                 {"images": [{"filepath": "val2014", "filename":
                                               "COCO_val2014_000000391895.jpg", "split": "train" |
                                               "restval" | "val" | "test", "sentences": [{"raw":
                                               "A man ..."}, ...], "cocoid": ..., "imgid": ...}]}
        ROOT/train2014/*.jpg, ROOT/val2014/*.jpg  images at ROOT/<filepath>/<filename>
        ROOT/flickr30k/                        optional: the Flickr30k layout below, also tested
    --data flickr30k --data-root ROOT
        ROOT/dataset_flickr30k.json            same format, without filepath/cocoid; splits
                                               train / val / test (29,000 / 1,014 / 1,000 images)
        ROOT/flickr30k-images/*.jpg            images at ROOT/flickr30k-images/<filename>
        ROOT/coco/                             optional: the COCO layout above, also tested

The other dataset's test set can live elsewhere: `ood={'flickr30k': DIR}` (--ood flickr30k=DIR).
Only `sentences[].raw`, `filename`, `split` (and `filepath` for COCO) are read; an image's id is
its index among the train + restval images. A missing or malformed JSON file, or a listed image
that is not on disk, is an error naming the file. Train images that fail to decode are skipped
with a warning (or an error with strict); test images must all decode.
"""

import json
import os
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from clip_model import tokenize
from data import DataError, ImageList

DATASETS = {"coco": "dataset_coco.json", "flickr30k": "dataset_flickr30k.json"}  # name -> Karpathy file
TRAIN_SPLITS = ("train", "restval")  # Flickr30k has no restval
TEST_CAPTIONS = 5  # captions kept per test image


@dataclass
class RetrievalSet:
    name: str  # 'coco' (5K test) or 'flickr30k' (1K test)
    images: Dataset  # (image, image index)
    tokens: torch.Tensor  # [T, L] long, the captions, T = 5 x images
    text_to_image: torch.Tensor  # [T] long, caption -> index of its image


@dataclass
class RetrievalData:
    train: Dataset  # (image, row), one row per training caption
    row_image_id: torch.Tensor  # [N] long, the row's image id: the MPM-NCE label
    row_tokens: torch.Tensor  # [N, L] long, the row's caption
    tests: list[RetrievalSet]  # the task's own test set first


def read_karpathy(name, root):
    """{split: [(image path, [caption, ...])]} from ROOT/dataset_<name>.json."""
    path = os.path.join(root, DATASETS[name])
    if not os.path.isfile(path):
        raise DataError(f"{path}: Karpathy split file not found (see data/retrieval.py for the layout)")
    try:
        with open(path) as f:
            entries = json.load(f)["images"]
        splits = {}
        for image in entries:
            folder = image["filepath"] if name == "coco" else "flickr30k-images"
            captions = [s["raw"] for s in image["sentences"]]
            splits.setdefault(image["split"], []).append((os.path.join(root, folder, image["filename"]), captions))
    except (ValueError, KeyError, TypeError) as e:  # bad JSON, missing field, wrong type
        raise DataError(f"{path}: not a Karpathy split file ({type(e).__name__}: {e})") from e
    missing = [p for images in splits.values() for p, _ in images if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{path}: {len(missing)} listed images are missing, e.g. {missing[0]}")
    return splits


def _test_set(name, images, transform, context_length):
    """images: [(path, captions)] of one test split -> RetrievalSet (first TEST_CAPTIONS captions each)."""
    captions = [(i, c) for i, (_, cs) in enumerate(images) for c in cs[:TEST_CAPTIONS]]
    return RetrievalSet(
        name,
        ImageList([(p, i) for i, (p, _) in enumerate(images)], transform, strict=True),
        tokenize([c for _, c in captions], context_length),
        torch.tensor([i for i, _ in captions]),
    )


def build(name, root, train_transform=None, eval_transform=None, context_length=77, *, ood=None, strict=False):
    """Train rows (one per caption of the train + restval images) and test sets of `name`;
    the other dataset's test set is added when found at ROOT/<other> or ood[other]."""
    if name not in DATASETS:
        raise DataError(f"unknown retrieval task {name!r}: expected one of {', '.join(DATASETS)}")
    roots = {name: root}
    for other, path in ({n: os.path.join(root, n) for n in DATASETS if n != name} | (ood or {})).items():
        if other not in DATASETS or other == name:
            raise DataError(
                f"--ood {other}={path}: --data {name} can add only the other retrieval "
                f"test set ({', '.join(n for n in DATASETS if n != name)})"
            )
        if os.path.isfile(os.path.join(path, DATASETS[other])):
            roots[other] = path
        else:
            print(f"data: {other} test set not found at {path}; skipped")
    splits = {n: read_karpathy(n, r) for n, r in roots.items()}
    for n, split in splits.items():
        if not split.get("test"):
            raise DataError(f"{os.path.join(roots[n], DATASETS[n])}: no images with split 'test'")
    train = [(p, c) for split in TRAIN_SPLITS for p, cs in splits[name].get(split, []) for c in cs]  # rows
    if not train:
        raise DataError(f"{os.path.join(root, DATASETS[name])}: no images with split 'train'")
    image_id = {p: i for i, p in enumerate(dict.fromkeys(p for p, _ in train))}
    tests = [_test_set(n, split["test"], eval_transform, context_length) for n, split in splits.items()]
    return RetrievalData(
        ImageList([(p, row) for row, (p, _) in enumerate(train)], train_transform, strict),
        torch.tensor([image_id[p] for p, _ in train]),
        tokenize([c for _, c in train], context_length),
        tests,
    )
