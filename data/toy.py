"""The toy world's tasks. --data toy: fine-tune on toy_world's `photo` style, test on `photo` and five shifts.
--data toy-specialised: the specialised dataset of the toy base-to-new job (--split base).

The shifted styles are named after the ImageNet sets they play (toy-v2, toy-sketch, toy-r, toy-a,
toy-c); 3,000 test images per split keep one standard error under 1 point (0.91 at worst, at 50%).
A photo validation split, disjoint from train and test, is where the toy lr rule scores
(toy_experiments.py).

CoCoOp's base-to-new benchmark is ImageNet and ten specialised datasets (EuroSAT, DTD, FGVC-Aircraft,
Flowers, ...), whose classes look a way that web captions of their names do not describe: that is where
16 shots teach CLIP most (CoCoOp, Table 1). --data toy-specialised is such a dataset in the toy world:
photos as toy-photo's, 70% of them drawn in a colour their class has in this dataset and never on the web
(toy_world.SPECIALISED_COLOUR); no shifted test sets.

The toy CLIP that the toy jobs fine-tune is loaded by clip_weights.load_toy_clip.
"""

from torchvision.transforms import Compose, Normalize, RandomHorizontalFlip

from clip_model import CLIP_MEAN, CLIP_STD
from data import EvalSet, TaskData, coop, toy_world

SIZES = dict(train_per_class=1000, test_per_class=250)
OOD = {"v2": "toy-v2", "sketch": "toy-sketch", "rendition": "toy-r", "adversarial": "toy-a", "corrupt": "toy-c"}


NAMES = ("toy", "toy-specialised")  # the --data names of this file


def task(shots=None, flip=False, name="toy"):
    """--data toy | toy-specialised: generated in memory, deterministic; 32 px images, already tensors;
    flip: --flip in training. The world is fixed (seed 0): --seed changes the training run, never the
    images, so rows of different seeds are scored on the same test images."""
    special = name == "toy-specialised"
    normalize = Normalize(CLIP_MEAN, CLIP_STD)
    augment = Compose([RandomHorizontalFlip(), normalize]) if flip else normalize  # a mirrored shape keeps its class
    train = _split("photo", "train", shots or SIZES["train_per_class"], transform=augment, specialised=special)
    ood = [] if special else [EvalSet(name, _split(style, "test")) for style, name in OOD.items()]
    test = EvalSet(name if special else "toy-photo", _split("photo", "test", specialised=special))
    return TaskData(list(toy_world.CLASSNAMES), list(toy_world.TEMPLATES), train, test, ood)


def validation(split=None, name="toy"):
    """The validation split of --data `name` (disjoint from train and test) that learning rates are chosen
    on, as a TaskData to score its test set; split='base': its base-class images among the base classes."""
    special = name == "toy-specialised"
    val = TaskData(
        list(toy_world.CLASSNAMES),
        list(toy_world.TEMPLATES),
        None,
        EvalSet(f"{name if special else 'toy-photo'}-val", _split("photo", "val", specialised=special)),
        [],
    )
    return coop.base_new(val)[0] if split else val


def _split(style, part, per_class=None, transform=None, specialised=False):
    per_class = per_class or SIZES["test_per_class"]
    transform = transform or Normalize(CLIP_MEAN, CLIP_STD)
    return toy_world.ToySplit(style, per_class, seed=0, split=part, transform=transform, specialised=specialised)
