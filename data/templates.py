"""Prompt templates: the sets a config's --prompts and --eval-prompts name, and each dataset's own.

R-Adapter (Sec. 3.4, 4.1) fills a class name into templates: in training one drawn at random per
image, at evaluation all of them averaged into the zero-shot classifier (evaluate.zero_shot_classifier).
A config names its set by one of:

    task          the dataset's own: the 80 OpenAI templates for ImageNet, CoOp's one hand-written
                  template per CoOp dataset (data/coop.py), the toy world's 8, a folder task's 6
    imagenet-80   the 80 OpenAI ImageNet templates (open_clip's OPENAI_IMAGENET_TEMPLATES), whatever the data
    a template    one literal template with '{}', e.g. 'a photo of a {}.'
"""

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from data import coop, imagenet, retrieval, toy, toy_world

TASK = "task"
IMAGENET_80 = "imagenet-80"
OPENAI_80 = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]  # the 80 strings with '{}'


def templates(name, task_templates):
    """A prompt set (TrainConfig.prompts, .eval_prompts) as a list of templates; task_templates: the
    task's own (TaskData.templates)."""
    if name == TASK:
        return list(task_templates)
    return list(OPENAI_80) if name == IMAGENET_80 else [name]


def own(data):
    """The templates of --data `data`, without reading it (none for the retrieval sets: captions)."""
    if data in toy.NAMES:
        return list(toy_world.TEMPLATES)
    if data == "folder":
        return list(imagenet.FOLDER_TEMPLATES)
    if data == "imagenet":
        return list(OPENAI_80)
    if data in coop.DATASETS:
        return [coop.DATASETS[data].template]
    if data in retrieval.DATASETS:
        return []
    raise ValueError(f"--data {data}: no templates known")


def valid(name):
    """Whether `name` names a prompt set: task, imagenet-80 or a template with '{}'."""
    return name in (TASK, IMAGENET_80) or "{}" in name
