"""Semantic segmentation data: COCO-Stuff-171 to train on, the six open-vocabulary benchmarks to test on
(CAT-Seg's protocol), in the layouts CAT-Seg's preparation scripts write (github.com/cvlab-kaist/CAT-Seg,
datasets/README.md and datasets/prepare_*.py). --data-root ROOT is the folder that holds them (CAT-Seg's
$DETECTRON2_DATASETS); under it, each set is every label file of its label folder with the image of the
same name (<name>.jpg) in its image folder:

  set         image folder / label folder (labels: *.png 8-bit, or *.tif 16-bit)        classes   ignore
  coco-stuff  coco-stuff/images/train2017 (train), val2017 (test)                    171       255
              coco-stuff/annotations_detectron2/train2017, val2017   (*.png)
  ade-150     ADEChallengeData2016/images/validation                                 150       255
              ADEChallengeData2016/annotations_detectron2/validation   (*.png)
  ade-847     ADE20K_2021_17_01/images_detectron2/validation                         847       65535
              ADE20K_2021_17_01/annotations_detectron2/validation   (*.tif)
  pc-59       VOCdevkit/VOC2010/JPEGImages                                           59        255
              VOCdevkit/VOC2010/annotations_detectron2/pc59_val   (*.png)
  pc-459      VOCdevkit/VOC2010/JPEGImages                                           459       459
              VOCdevkit/VOC2010/annotations_detectron2/pc459_val   (*.tif)
  voc-20      VOCdevkit/VOC2012/JPEGImages                                           20        255 (and background)
              VOCdevkit/VOC2012/annotations_detectron2/val   (*.png)
  voc-20b     VOCdevkit/VOC2012/JPEGImages                                           21        255
              VOCdevkit/VOC2012/annotations_detectron2_bg/val   (*.png; 20 = background)

A label is the class index (the order of data/segmentation_classes.py) of each pixel of its image, at
the image's size. Readers map the set's ignore value to IGNORE. VOC-20b is prompted with 59 names, the
20 classes and 39 Pascal Context classes that stand for the background (prompt_class maps them to 20).
An image or label that fails to decode is skipped with one warning (counted by collate_skip; an error
with strict); a label value that is neither a class nor the ignore value is warned about once per file
and left in place, and the loss and mIoU treat it as unlabelled (evaluation counts those pixels). A
missing folder or image, or a label of another size than its image, is a DataError naming the file.
"""

import os
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from clip_model import CLIP_MEAN, CLIP_STD
from data import DataError
from data import segmentation_classes as classes

IGNORE = -1  # every reader maps its set's ignore value to this
TEST = ("ade-847", "pc-459", "ade-150", "pc-59", "voc-20", "voc-20b")  # CAT-Seg's table, in its order


@dataclass(frozen=True)
class Layout:
    images: str  # image folder under the root
    labels: str  # label folder under the root
    ext: str  # label file extension
    ignore: int  # the label value of unlabelled pixels on disk
    names: list  # the prompted class names
    prompt_class: Optional[list] = None  # class of each prompted name, when names are not the classes

    @property
    def classes(self):
        return len(self.names) if self.prompt_class is None else max(self.prompt_class) + 1


COCO, ADE150, ADE847 = "coco-stuff", "ADEChallengeData2016", "ADE20K_2021_17_01"
COCO_STUFF_TRAIN_IMAGES = 118_287  # train2017: CAT-Seg's 80,000 iterations of 4 images are 2.7 passes over it
VOC2010, VOC2012 = "VOCdevkit/VOC2010", "VOCdevkit/VOC2012"
LAYOUTS = {
    "coco-stuff-train": Layout(
        f"{COCO}/images/train2017", f"{COCO}/annotations_detectron2/train2017", ".png", 255, classes.COCO_STUFF_171
    ),
    "coco-stuff": Layout(
        f"{COCO}/images/val2017", f"{COCO}/annotations_detectron2/val2017", ".png", 255, classes.COCO_STUFF_171
    ),
    "ade-150": Layout(
        f"{ADE150}/images/validation", f"{ADE150}/annotations_detectron2/validation", ".png", 255, classes.ADE_150
    ),
    "ade-847": Layout(
        f"{ADE847}/images_detectron2/validation",
        f"{ADE847}/annotations_detectron2/validation",
        ".tif",
        65535,
        classes.ADE_847,
    ),
    "pc-59": Layout(f"{VOC2010}/JPEGImages", f"{VOC2010}/annotations_detectron2/pc59_val", ".png", 255, classes.PC_59),
    "pc-459": Layout(
        f"{VOC2010}/JPEGImages", f"{VOC2010}/annotations_detectron2/pc459_val", ".tif", 459, classes.PC_459
    ),
    "voc-20": Layout(f"{VOC2012}/JPEGImages", f"{VOC2012}/annotations_detectron2/val", ".png", 255, classes.VOC_20),
    "voc-20b": Layout(
        f"{VOC2012}/JPEGImages",
        f"{VOC2012}/annotations_detectron2_bg/val",
        ".png",
        255,
        classes.VOC_20B_PROMPTS,
        prompt_class=list(range(20)) + [20] * 39,
    ),
}


def shortest_edge(h, w, size, max_size=None):
    """(h', w') of detectron2's ResizeShortestEdge: the shorter side scaled to `size`, then both scaled down
    so that the longer is at most max_size (None: no cap), each rounded to the nearest pixel."""
    scale = size / min(h, w)
    new_h, new_w = (size, scale * w) if h < w else (scale * h, size)
    if max_size is not None and max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


class ResizeShortestEdge:
    """(image, label) -> both resized to shortest_edge's size: the image bilinear (a PIL image by PIL, as
    detectron2 resizes uint8 images; antialiased), the label nearest."""

    def __init__(self, size, max_size=None):
        self.size, self.max_size = size, max_size

    def __call__(self, image, label):
        size = list(shortest_edge(*v2.functional.get_size(image), self.size, self.max_size))
        return v2.functional.resize(image, size, antialias=True), v2.functional.resize(label, size)


class RandomCropAtMost:
    """detectron2's absolute RandomCrop: a random min(size, h) x min(size, w) crop of image and label alike."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image, label):
        h, w = v2.functional.get_size(image)
        crop_h, crop_w = min(self.size, h), min(self.size, w)
        top, left = (int(torch.randint(n + 1, ())) for n in (h - crop_h, w - crop_w))
        return tuple(v2.functional.crop(x, top, left, crop_h, crop_w) for x in (image, label))


class PadTo:
    """The released mapper's padding: image and label padded on the right and bottom to size x size, the uint8
    image with 128, the label with IGNORE (no class: a negative for every class in the loss)."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image, label):
        h, w = v2.functional.get_size(image)
        padding = [0, 0, self.size - w, self.size - h]  # left, top, right, bottom
        if not any(padding):
            return image, label
        return v2.functional.pad(image, padding, fill=128), v2.functional.pad(label, padding, fill=IGNORE)


def train_transform(size=384, max_size=1333):
    """CAT-Seg's training augmentation (released config and mapper): shorter side resized to `size`, the
    longer to at most max_size (detectron2's default INPUT.MAX_SIZE_TRAIN; labels: nearest), a random crop of
    at most size x size, colour jitter, a random horizontal flip, padding to size x size (right and bottom);
    then CLIP's normalisation. Switch: max_size=None leaves the longer side uncapped. The released SSD colour
    augmentation applies each jitter with probability 1/2 and shifts brightness additively; torchvision's
    ColorJitter applies all four, in random order."""
    return v2.Compose(
        [
            ResizeShortestEdge(size, max_size),
            v2.ToImage(),
            RandomCropAtMost(size),
            v2.ColorJitter(brightness=32 / 255, contrast=0.5, saturation=0.5, hue=18 / 180),
            v2.RandomHorizontalFlip(),
            PadTo(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def eval_transform():
    """The image at its own size, normalised; the label untouched (segment.sliding_window makes the released
    test resize: shorter side to 640, then 640 x 640)."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)])


class SegmentationSet(Dataset):
    """(image [3, H, W] float, label [H, W] long) pairs through `transform(image, label)`; an unreadable
    file gives None."""

    def __init__(self, name, samples, layout: Layout, transform, strict=False):
        self.name, self.samples, self.layout, self.transform, self.strict = name, samples, layout, transform, strict
        self.names, self.classes = layout.names, layout.classes
        self.columns = {name: None}  # its mIoU columns: {column: class indices, None for all} (evaluate_sets)
        self.prompt_class = None if layout.prompt_class is None else torch.tensor(layout.prompt_class)
        self._warned = set()

    def __len__(self):
        return len(self.samples)

    def _warn_once(self, path, message):
        if path not in self._warned:
            self._warned.add(path)
            warnings.warn(message, stacklevel=3)

    def _open(self, path, what):
        try:
            with Image.open(path) as f:
                f.load()  # decodes now: a truncated file raises here
                return f.convert("RGB") if what == "image" else f.copy()
        except (OSError, SyntaxError) as e:
            if self.strict:
                raise DataError(f"{path}: cannot read {what} ({e})") from e
            self._warn_once(path, f"skipping unreadable {what} {path}: {e}")
            return None

    def __getitem__(self, i):
        image_path, label_path = self.samples[i]
        image, label = self._open(image_path, "image"), self._open(label_path, "label")
        if image is None or label is None:
            return None
        if image.size != label.size:
            raise DataError(
                f"{label_path}: label is {label.size[0]}x{label.size[1]}, image {image.size[0]}x{image.size[1]}"
            )
        label = torch.from_numpy(np.array(label, dtype=np.int64))
        label[label == self.layout.ignore] = IGNORE
        unknown = label[label >= self.classes].unique()
        if len(unknown):
            values = ", ".join(map(str, unknown[:5].tolist())) + (", ..." if len(unknown) > 5 else "")
            self._warn_once(
                label_path,
                f"{label_path}: label values {values} are neither classes (0..{self.classes - 1}) nor the "
                f"ignore value {self.layout.ignore}; their pixels count as unlabelled",
            )
        image, label = self.transform(image, tv_tensors.Mask(label))
        return image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)


def build(name, root, transform, strict=False):
    """The SegmentationSet `name` (a LAYOUTS key) under root."""
    layout = LAYOUTS[name]
    image_dir, label_dir = os.path.join(root, layout.images), os.path.join(root, layout.labels)
    for folder in (image_dir, label_dir):
        if not os.path.isdir(folder):
            raise DataError(f"{folder}: folder not found ({name}; layouts in data/segmentation.py)")
    labels = sorted(f for f in os.listdir(label_dir) if f.endswith(layout.ext))
    if not labels:
        raise DataError(f"{label_dir}: no *{layout.ext} label files ({name})")
    images = set(os.listdir(image_dir))
    samples = []
    for label in labels:
        image = label[: -len(layout.ext)] + ".jpg"
        if image not in images:
            raise DataError(
                f"{os.path.join(image_dir, image)}: image not found for label {os.path.join(label_dir, label)}"
            )
        samples.append((os.path.join(image_dir, image), os.path.join(label_dir, label)))
    return SegmentationSet(name, samples, layout, transform, strict)


def test_sets(names, root, strict=False):
    """The named test sets found under root; an absent one is skipped with one printed line."""
    found = []
    for name in names:
        if name not in LAYOUTS or name == "coco-stuff-train":
            raise DataError(
                f"--test {name}: expected some of {', '.join(n for n in LAYOUTS if n != 'coco-stuff-train')}"
            )
        layout = LAYOUTS[name]
        if not os.path.isdir(os.path.join(root, layout.labels)):
            print(f"data: {name} not found at {os.path.join(root, layout.labels)}; skipped")
            continue
        found.append(build(name, root, eval_transform(), strict))
    return found


# ---------------------------------------------------------------------- mIoU
def iou_counts(pred, target, classes):
    """[3, C] counts of one image: intersection, predicted area and labelled area of each class, over the
    pixels whose label is a class (IGNORE and unknown values left out). pred, target: [H, W] long."""
    known = (target >= 0) & (target < classes)
    pred, target = pred[known], target[known]
    counts = [target[pred == target], pred, target]
    return torch.stack([torch.bincount(c, minlength=classes) for c in counts])


MIOU_RULES = ("labels", "union")


def miou(counts, classes=None, rule="labels"):
    """Mean IoU (%) from summed counts [..., 3, C] over all classes, or the subset `classes`, that the rule keeps:
    labels  the classes present in the labels (the default): detectron2's SemSegEvaluator since July 2022
            (commit f3c1bc1), the evaluator CAT-Seg installs, so CAT-Seg's numbers; a class that is predicted
            but never labelled does not count
    union   the classes present in the labels or the predictions: torchmetrics' MulticlassJaccardIndex
            (average="macro") and detectron2 before that commit; such a class counts with IoU 0"""
    if rule not in MIOU_RULES:
        raise ValueError(f"mIoU rule {rule!r}: expected one of {', '.join(MIOU_RULES)}")
    inter, pred, label = counts.double().unbind(-2)
    union = pred + label - inter
    present = (label > 0) if rule == "labels" else (union > 0)
    if classes is not None:
        present &= torch.isin(torch.arange(counts.shape[-1]), torch.as_tensor(classes))
    iou = torch.where(present, inter / union.clamp(min=1), 0.0)
    return 100 * iou.sum(-1) / present.sum(-1)
