"""Image-text retrieval: COCO and Flickr30k on Karpathy's splits (R-Adapter Sec. 4, PAPER.md 2.7).

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

Public: DATASETS, RetrievalData, RetrievalSet, read_karpathy, build_retrieval, recall_at_k,
evaluate_retrieval.
"""
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from clip_model import tokenize
from data import ImageList

DATASETS = {'coco': 'dataset_coco.json', 'flickr30k': 'dataset_flickr30k.json'}  # name -> Karpathy file
TRAIN_SPLITS = ('train', 'restval')  # Flickr30k has no restval
TEST_CAPTIONS = 5  # captions kept per test image


@dataclass
class RetrievalSet:
    name: str                    # 'coco' (5K test) or 'flickr30k' (1K test)
    images: Dataset              # (image, image index)
    tokens: torch.Tensor         # [T, L] long, the captions, T = 5 x images
    text_to_image: torch.Tensor  # [T] long, caption -> index of its image


@dataclass
class RetrievalData:
    train: Dataset               # (image, row), one row per training caption
    row_image_id: torch.Tensor   # [N] long, the row's image id: the MPM-NCE label
    row_tokens: torch.Tensor     # [N, L] long, the row's caption
    tests: list[RetrievalSet]    # the task's own test set first


def read_karpathy(name, root):
    """{split: [(image path, [caption, ...])]} from ROOT/dataset_<name>.json."""
    path = os.path.join(root, DATASETS[name])
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: Karpathy split file not found (see retrieval.py for the layout)')
    try:
        with open(path) as f:
            entries = json.load(f)['images']
        splits = {}
        for image in entries:
            folder = image['filepath'] if name == 'coco' else 'flickr30k-images'
            captions = [s['raw'] for s in image['sentences']]
            splits.setdefault(image['split'], []).append((os.path.join(root, folder, image['filename']), captions))
    except (ValueError, KeyError, TypeError) as e:  # bad JSON, missing field, wrong type
        raise ValueError(f'{path}: not a Karpathy split file ({type(e).__name__}: {e})') from e
    missing = [p for images in splits.values() for p, _ in images if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f'{path}: {len(missing)} listed images are missing, e.g. {missing[0]}')
    return splits


def _test_set(name, images, transform, context_length):
    """images: [(path, captions)] of one test split -> RetrievalSet (first TEST_CAPTIONS captions each)."""
    captions = [(i, c) for i, (_, cs) in enumerate(images) for c in cs[:TEST_CAPTIONS]]
    return RetrievalSet(name, ImageList([(p, i) for i, (p, _) in enumerate(images)], transform, strict=True),
                        tokenize([c for _, c in captions], context_length),
                        torch.tensor([i for i, _ in captions]))


def build_retrieval(name: str, root: str, train_transform: Optional[Callable] = None,
                    eval_transform: Optional[Callable] = None, context_length: int = 77, *,
                    ood: Optional[dict[str, str]] = None, strict: bool = False) -> RetrievalData:
    """Train rows (one per caption of the train + restval images) and test sets of `name`;
    the other dataset's test set is added when found at ROOT/<other> or ood[other]."""
    if name not in DATASETS:
        raise ValueError(f"unknown retrieval task {name!r}: expected one of {', '.join(DATASETS)}")
    if root is None:
        raise ValueError(f"retrieval task {name!r} needs a root directory (--data-root)")
    roots = {name: root}
    for other, path in ({n: os.path.join(root, n) for n in DATASETS if n != name} | (ood or {})).items():
        if other not in DATASETS or other == name:
            raise ValueError(f"--ood {other}={path}: --data {name} can add only the other retrieval "
                             f"test set ({', '.join(n for n in DATASETS if n != name)})")
        if os.path.isfile(os.path.join(path, DATASETS[other])):
            roots[other] = path
        else:
            print(f'data: {other} test set not found at {path}; skipped')
    splits = {n: read_karpathy(n, r) for n, r in roots.items()}
    for n, split in splits.items():
        if not split.get('test'):
            raise ValueError(f"{os.path.join(roots[n], DATASETS[n])}: no images with split 'test'")
    train = [(p, c) for split in TRAIN_SPLITS for p, cs in splits[name].get(split, []) for c in cs]  # rows
    if not train:
        raise ValueError(f"{os.path.join(root, DATASETS[name])}: no images with split 'train'")
    image_id = {p: i for i, p in enumerate(dict.fromkeys(p for p, _ in train))}
    tests = [_test_set(n, split['test'], eval_transform, context_length) for n, split in splits.items()]
    return RetrievalData(ImageList([(p, row) for row, (p, _) in enumerate(train)], train_transform, strict),
                         torch.tensor([image_id[p] for p, _ in train]),
                         tokenize([c for _, c in train], context_length), tests)


def recall_at_k(image_features, text_features, text_to_image, ks=(1, 5, 10)):
    """Recall@k (%) both ways from [I, D] image and [T, D] text features (normalised) and the
    [T] caption -> image map. Image -> text: a hit if ANY of the image's captions is in its
    top k; text -> image: a hit if the caption's image is in its top k. rsum = sum of all six."""
    sims = image_features @ text_features.T  # [I, T]
    images = torch.arange(len(image_features), device=sims.device)
    text_to_image = text_to_image.to(sims.device)
    i2t = text_to_image[sims.topk(min(max(ks), sims.shape[1]), dim=1).indices] == images[:, None]  # [I, k]
    t2i = sims.T.topk(min(max(ks), sims.shape[0]), dim=1).indices == text_to_image[:, None]  # [T, k]
    out = {f'i2t_R@{k}': 100 * i2t[:, :k].any(1).float().mean().item() for k in ks}
    out |= {f't2i_R@{k}': 100 * t2i[:, :k].any(1).float().mean().item() for k in ks}
    out['rsum'] = sum(out.values())
    return out


@torch.no_grad()
def evaluate_retrieval(model, test_set: RetrievalSet, batch_size=256, workers=4, autocast_dtype=None):
    """recall_at_k of `model` on one test set: every image and caption encoded once."""
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(test_set.images, batch_size=batch_size, num_workers=workers)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        f = torch.cat([model.encode_image(x.to(device), normalize=True).float() for x, _ in loader])  # [I, D]
        g = torch.cat([model.encode_text(t.to(device), normalize=True).float()
                       for t in test_set.tokens.split(batch_size)])  # [T, D]
    return recall_at_k(f, g, test_set.text_to_image)
