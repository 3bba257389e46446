"""data.py on tiny generated trees: 8x8 images, a dozen real ImageNet wnids, fake ObjectNet maps."""

import io
import json
import os
import re
import shutil
import warnings

import pytest
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

import data
from data import build_task, collate_skip
from data.imagenet import FOLDER_TEMPLATES, IMAGENET_A_INDICES, IMAGENET_R_INDICES
from data.imagenet import IMAGENET_WNIDS as W

TASK = [1, 2, 6, 11, 13, 22, 100, 409, 530, 954, 980, 999]  # ImageNet indices of the test tree
TASK_WNIDS = [W[i] for i in TASK]  # sorted, since TASK is
V2 = "imagenetv2-matched-frequency-format-val"


def image_bytes(size=(8, 8), fmt="JPEG", noise=False):
    image = Image.effect_noise(size, 64).convert("RGB") if noise else Image.new("RGB", size, "red")
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


JPEG = image_bytes()


def write_images(folder, n, ext=".JPEG", content=JPEG):
    os.makedirs(folder, exist_ok=True)
    for k in range(n):
        with open(os.path.join(folder, f"img{k}{ext}"), "wb") as f:
            f.write(content)


def make_objectnet(path, objectnet_to_imagenet=None):
    """Fake objectnet-1.0/ in the real mapping-file formats. Sorted-wnid index i sits on line
    perm[i] of imagenet_to_label_2012_v2, as ILSVRC-2012 ids are not in sorted-wnid order."""
    maps = path / "mappings"
    maps.mkdir(parents=True)
    folder_to_label = {"alarm_clock": "Alarm clock", "backpack": "Backpack", "banana": "Banana", "squeegee": "Squeegee"}
    if objectnet_to_imagenet is None:
        objectnet_to_imagenet = {
            "Alarm clock": "analog clock; digital clock",
            "Backpack": "backpack, back pack, knapsack, packsack, rucksack, haversack",
            "Banana": "banana",
        }
    perm = [(7 * i + 3) % 1000 for i in range(1000)]
    names = {
        409: "analog clock",
        530: "digital clock",
        954: "banana",
        134: "crane",
        517: "crane",
        414: "backpack, back pack, knapsack, packsack, rucksack, haversack",
    }
    lines = [""] * 1000
    for i in range(1000):
        lines[perm[i]] = names.get(i, f"imagenet class {i}")
    (maps / "imagenet_to_label_2012_v2").write_text("\n".join(lines) + "\n")
    (maps / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({str(i): perm[i] for i in range(1000)}))
    (maps / "folder_to_objectnet_label.json").write_text(json.dumps(folder_to_label))
    (maps / "objectnet_to_imagenet_1k.json").write_text(json.dumps(objectnet_to_imagenet))
    png = image_bytes((12, 10), "PNG")
    write_images(path / "images" / "alarm_clock", 2, ".png", png)
    for folder in ("backpack", "banana", "squeegee"):
        write_images(path / "images" / folder, 1, ".png", png)


def make_imagenet(root, ood=True):
    """ImageNet test tree: 12 wnids (3 train images each, 2 for W[999]) and the five shifts."""
    for w in TASK_WNIDS:
        write_images(root / "train" / w, 2 if w == W[999] else 3)
        write_images(root / "val" / w, 2)
    if not ood:
        return root
    for k in (0, 2, 10):
        write_images(root / V2 / str(k), 1, ".jpeg")
    for w in TASK_WNIDS:
        write_images(root / "sketch" / w, 1)
    for i in (2, 11, 954):
        write_images(root / "imagenet-r" / W[i], 1, ".jpg")
    for i in (6, 980):
        write_images(root / "imagenet-a" / W[i], 1)
    make_objectnet(root / "objectnet-1.0")
    return root


# Trees are kept small (pytest's later clean-up of tmp dirs costs time per file): tests that
# only read share one tree; tests that break a set build just that set and pass it via `ood`.
@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return make_imagenet(tmp_path_factory.mktemp("imagenet"))


def ood_by_name(task):
    return {s.name: s for s in task.ood}


def folder_of(path):
    return os.path.basename(os.path.dirname(path))


# ------------------------------------------------------------------------------ tables


def test_wnid_table_is_1000_sorted_unique_wnids():
    assert len(W) == 1000 and len(set(W)) == 1000 and W == sorted(W)
    assert all(re.fullmatch(r"n\d{8}", w) for w in W)
    assert (W[0], W[409], W[954], W[999]) == ("n01440764", "n02708093", "n07753592", "n15075141")


@pytest.mark.parametrize("indices", [IMAGENET_R_INDICES, IMAGENET_A_INDICES])
def test_subset_tables_have_200_classes_within_the_1000(indices):
    assert len(indices) == 200 and len(set(indices)) == 200 and indices == sorted(indices)
    assert all(0 <= i < 1000 for i in indices)


def test_tables_match_timms_packaged_copies():
    timm = pytest.importorskip("timm")
    info = os.path.join(os.path.dirname(timm.__file__), "data", "_info")

    def read(name):
        with open(os.path.join(info, name)) as f:
            return f.read().split()

    assert read("imagenet_synsets.txt") == W
    assert [W[i] for i in IMAGENET_R_INDICES] == read("imagenet_r_synsets.txt")
    assert [W[i] for i in IMAGENET_A_INDICES] == read("imagenet_a_synsets.txt")


# ------------------------------------------------------------------------------ ImageNet


def test_imagenet_classes_are_sorted_wnids_named_from_the_table(imagenet):
    task = build_task("imagenet", imagenet)
    assert task.classnames == [IMAGENET_CLASSNAMES[i] for i in TASK]
    assert task.classnames[:3] == ["goldfish", "great white shark", "stingray"]
    for ds in (task.train, task.test.dataset):
        assert all(folder_of(p) == TASK_WNIDS[label] for p, label in ds.samples)
    assert len(task.train) == 11 * 3 + 2 and len(task.test.dataset) == 12 * 2
    assert task.test.name == "imagenet" and task.test.class_index is None


def test_imagenet_templates_are_the_80_openai_format_strings(imagenet):
    templates = build_task("imagenet", imagenet).templates
    assert len(templates) == 80 and all(t.count("{}") == 1 for t in templates)
    assert "a bad photo of a {}." in templates


def test_v2_integer_folders_are_class_indices_not_string_order(imagenet):
    v2 = ood_by_name(build_task("imagenet", imagenet))["imagenet-v2"]
    labels = {folder_of(p): label for p, label in v2.dataset.samples}
    assert labels == {"0": 0, "2": 2, "10": 10}  # string order would make '10' class 1
    assert v2.dataset[[folder_of(p) for p, _ in v2.dataset.samples].index("10")][1] == 10
    assert v2.class_index is None


def test_imagenet_r_and_a_project_onto_their_columns(imagenet):
    sets = ood_by_name(build_task("imagenet", imagenet))
    logits = torch.arange(12.0).repeat(2, 1)  # [2, 12], column j holds j
    r, a = sets["imagenet-r"], sets["imagenet-a"]
    assert r.project_logits(logits).tolist() == [[1.0, 3.0, 9.0]] * 2
    assert a.project_logits(logits).tolist() == [[2.0, 10.0]] * 2
    assert {folder_of(p): label for p, label in r.dataset.samples} == {W[2]: 0, W[11]: 1, W[954]: 2}


def test_sketch_with_all_task_classes_is_identity(imagenet):
    sketch = ood_by_name(build_task("imagenet", imagenet))["imagenet-sketch"]
    logits = torch.randn(3, 12)
    assert sketch.class_index is None and torch.equal(sketch.project_logits(logits), logits)
    assert all(folder_of(p) == TASK_WNIDS[label] for p, label in sketch.dataset.samples)


def test_objectnet_keeps_mapped_classes_and_scores_max_over_group(imagenet):
    objectnet = ood_by_name(build_task("imagenet", imagenet))["objectnet"]
    # alarm_clock -> analog clock (task 7), digital clock (task 8); banana -> task 9;
    # backpack's ImageNet class is not in the test task; squeegee has no ImageNet class
    assert objectnet.class_groups == [[7, 8], [9]]
    labels = sorted((folder_of(p), label) for p, label in objectnet.dataset.samples)
    assert labels == [("alarm_clock", 0), ("alarm_clock", 0), ("banana", 1)]
    logits = torch.randn(5, 12)
    expected = torch.stack([torch.maximum(logits[:, 7], logits[:, 8]), logits[:, 9]], dim=1)
    assert torch.equal(objectnet.project_logits(logits), expected)


def test_objectnet_crops_2px_border_before_eval_transform(imagenet):
    task = build_task("imagenet", imagenet, eval_transform=transforms.PILToTensor())
    objectnet = ood_by_name(task)["objectnet"]
    image, _ = objectnet.dataset[0]  # stored 12 x 10 (w x h)
    assert image.shape == (3, 6, 8)  # [3, H - 4, W - 4]
    assert ood_by_name(task)["imagenet-a"].dataset[0][0].shape == (3, 8, 8)  # others uncropped


def test_absent_set_is_skipped_with_one_line(imagenet, tmp_path, capsys):
    task = build_task("imagenet", imagenet, ood={"objectnet": tmp_path / "nowhere"})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "objectnet" in lines[0] and "skipped" in lines[0]
    assert [s.name for s in task.ood] == ["imagenet-v2", "imagenet-r", "imagenet-a", "imagenet-sketch"]


def test_ood_dict_gives_explicit_paths_and_user_sets(imagenet, tmp_path):
    write_images(tmp_path / "elsewhere-r" / W[954], 1)
    write_images(tmp_path / "mine" / W[6], 1)
    write_images(tmp_path / "mine" / W[999], 1)
    task = build_task(
        "imagenet", imagenet, ood={"imagenet-r": str(tmp_path / "elsewhere-r"), "mine": tmp_path / "mine"}
    )
    sets = ood_by_name(task)
    assert sets["imagenet-r"].class_index.tolist() == [9]
    assert sets["mine"].class_index.tolist() == [2, 11]


def test_train_is_optional(tmp_path, capsys):
    root = make_imagenet(tmp_path, ood=False)
    shutil.rmtree(root / "train")
    task = build_task("imagenet", root)
    assert task.train is None and task.classnames == [IMAGENET_CLASSNAMES[i] for i in TASK]
    assert "no train folder" in capsys.readouterr().out
    with pytest.raises(ValueError, match="needs a train folder"):
        build_task("imagenet", root, shots=1)


@pytest.mark.parametrize("breakage", ["empty_val_class", "val_differs", "unknown_train_wnid"])
def test_malformed_id_folders_raise_naming_the_folder(tmp_path, breakage):
    root = make_imagenet(tmp_path, ood=False)
    bad = {
        "empty_val_class": root / "val" / W[100],
        "val_differs": root / "val",
        "unknown_train_wnid": root / "train" / "n99999999",
    }[breakage]
    if breakage == "empty_val_class":
        shutil.rmtree(bad)
        bad.mkdir()
    elif breakage == "val_differs":  # a val class that train does not have
        write_images(bad / W[4], 1)
    else:
        write_images(bad, 1)
        write_images(root / "val" / "n99999999", 1)
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ":"):
        build_task("imagenet", root)


@pytest.mark.parametrize(
    "name, folders, bad_folder",
    [
        ("imagenet-r", [W[2], W[4]], W[4]),  # an ImageNet-R wnid outside the task
        ("imagenet-sketch", [W[2], "n99999999"], "n99999999"),  # not an ImageNet wnid
        ("imagenet-v2", ["0", "12"], "12"),  # class 12 of a 12-class task
        ("imagenet-v2", ["0", "n01440764"], "n01440764"),  # not an integer
        ("imagenet-a", [W[6], W[980]], W[980]),  # an empty class folder
    ],
)
def test_malformed_ood_sets_raise_naming_the_folder(imagenet, tmp_path, name, folders, bad_folder):
    for folder in folders:
        write_images(tmp_path / name / folder, 0 if name == "imagenet-a" and folder == bad_folder else 1)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / name / bad_folder))):
        build_task("imagenet", imagenet, ood={name: tmp_path / name})


def test_objectnet_empty_class_folder_raises_naming_it(imagenet, tmp_path):
    make_objectnet(tmp_path / "objectnet")
    banana = tmp_path / "objectnet" / "images" / "banana"
    shutil.rmtree(banana)
    banana.mkdir()
    with pytest.raises(ValueError, match=re.escape(str(banana))):
        build_task("imagenet", imagenet, ood={"objectnet": tmp_path / "objectnet"})


@pytest.mark.parametrize("filename", ["folder_to_objectnet_label.json", "imagenet_to_label_2012_v2"])
def test_objectnet_missing_mapping_file_raises_naming_it(imagenet, tmp_path, filename):
    make_objectnet(tmp_path / "objectnet")
    (tmp_path / "objectnet" / "mappings" / filename).unlink()
    with pytest.raises(ValueError, match=re.escape(filename)):
        build_task("imagenet", imagenet, ood={"objectnet": tmp_path / "objectnet"})


@pytest.mark.parametrize(
    "imagenet_names, message",
    [
        ("analog clock; grandfather clock", "'grandfather clock' matches 0"),
        ("crane", "'crane' matches 2"),  # two ImageNet classes share this WordNet name
    ],
)
def test_objectnet_unresolvable_imagenet_name_raises(imagenet, tmp_path, imagenet_names, message):
    make_objectnet(tmp_path / "objectnet", {"Alarm clock": imagenet_names})
    with pytest.raises(ValueError, match=re.escape(message)):
        build_task("imagenet", imagenet, ood={"objectnet": tmp_path / "objectnet"})


# ------------------------------------------------------------------------------ full ImageNet


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """val/ with all 1000 wnids, and OOD sets that are right or wrong for the full task. Class
    folders are symlinks to one image folder, to keep the tree small."""
    root = tmp_path_factory.mktemp("full")
    write_images(root / "one", 1)
    (root / "val").mkdir()
    (root / "r200").mkdir()
    for w in W:
        (root / "val" / w).symlink_to(root / "one", target_is_directory=True)
    for i in IMAGENET_R_INDICES:
        (root / "r200" / W[i]).symlink_to(root / "one", target_is_directory=True)
    for w in (W[1], W[0]):  # one ImageNet-R class, one other class: not the 200 R wnids
        write_images(root / "r_wrong" / w, 1)
    for k in range(3):
        write_images(root / "v2_3" / str(k), 1)
    make_objectnet(root / "objectnet3")
    return root


def test_full_imagenet_uses_all_1000_names(full, capsys):
    task = build_task("imagenet", full)
    assert task.classnames == list(IMAGENET_CLASSNAMES) and len(task.test.dataset) == 1000
    assert task.ood == [] and capsys.readouterr().out.count("skipped") == 5


def test_full_imagenet_r_is_validated_against_the_known_subset(full):
    r = build_task("imagenet", full, ood={"imagenet-r": full / "r200"}).ood[0]
    assert r.class_index.tolist() == IMAGENET_R_INDICES
    with pytest.raises(ValueError, match=re.escape(str(full / "r_wrong")) + ".*expected its 200"):
        build_task("imagenet", full, ood={"imagenet-r": full / "r_wrong"})


def test_full_imagenet_checks_v2_and_objectnet_class_counts(full):
    with pytest.raises(ValueError, match="expected 1000 class folders"):
        build_task("imagenet", full, ood={"imagenet-v2": full / "v2_3"})
    with pytest.raises(ValueError, match="expected the 113 ObjectNet classes"):
        build_task("imagenet", full, ood={"objectnet": full / "objectnet3"})


# ------------------------------------------------------------------------------ few-shot


def test_few_shot_takes_k_per_class_deterministically(imagenet, monkeypatch):
    full_train = set(build_task("imagenet", imagenet).train.samples)
    a = build_task("imagenet", imagenet, shots=2, seed=0).train.samples
    assert len(a) == 24 and set(a) <= full_train
    assert sorted(label for _, label in a) == sorted(list(range(12)) * 2)
    real_walk = os.walk

    def reversed_walk(top, **kwargs):  # the filesystem may list files in any order
        for d, sub, files in real_walk(top, **kwargs):
            yield d, sub, files[::-1]

    monkeypatch.setattr(os, "walk", reversed_walk)
    assert build_task("imagenet", imagenet, shots=2, seed=0).train.samples == a
    assert build_task("imagenet", imagenet, shots=2, seed=1).train.samples != a


def test_few_shot_too_few_images_names_the_class(imagenet):
    too_few = re.escape(str(imagenet / "train" / W[999])) + ".*2 images"
    with pytest.raises(ValueError, match=too_few):
        build_task("imagenet", imagenet, shots=3)


# ------------------------------------------------------------------------------ folder task


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "boats_and_cars"
    for c in ("red_car", "blue_boat"):
        write_images(root / "train" / c, 2)
        write_images(root / "test" / c, 2)
        write_images(tmp_path / "drawings" / c, 1)
    return root


def test_folder_task_names_templates_and_extra_sets(folder, capsys):
    task = build_task(
        "folder", folder, ood={"drawings": folder.parent / "drawings", "missing": folder.parent / "nowhere"}
    )
    assert task.classnames == ["blue boat", "red car"]
    assert task.templates == FOLDER_TEMPLATES and all("{}" in t for t in task.templates)
    assert task.test.name == "boats_and_cars" and len(task.test.dataset) == 4
    assert all(folder_of(p) == ["blue_boat", "red_car"][label] for p, label in task.train.samples)
    assert [s.name for s in task.ood] == ["drawings"] and task.ood[0].class_index is None
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "missing" in lines[0]


def test_folder_task_extra_set_with_other_classes_raises(folder):
    write_images(folder.parent / "drawings" / "green_bus", 1)
    with pytest.raises(ValueError, match=re.escape(str(folder.parent / "drawings"))):
        build_task("folder", folder, ood={"drawings": folder.parent / "drawings"})


def test_folder_task_classnames_from_json_or_list(folder, tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"red_car": "sports car", "blue_boat": "canoe"}))
    assert build_task("folder", folder, classnames=str(names)).classnames == ["canoe", "sports car"]
    assert build_task("folder", folder, classnames=["a", "b"]).classnames == ["a", "b"]
    names.write_text(json.dumps({"red_car": "sports car"}))
    with pytest.raises(ValueError, match="blue_boat"):
        build_task("folder", folder, classnames=names)
    with pytest.raises(ValueError, match="1 entries for 2 classes"):
        build_task("folder", folder, classnames=["a"])


def test_unknown_task_name_raises(folder):
    with pytest.raises(ValueError, match="cifar"):
        build_task("cifar", folder)


# ------------------------------------------------------------------------------ bad images


@pytest.fixture
def with_truncated(folder):
    """The folder task plus a JPEG cut off halfway through its scan data."""
    whole = image_bytes((64, 64), noise=True)
    bad = folder / "test" / "red_car" / "truncated.jpg"
    bad.write_bytes(whole[: len(whole) // 2])
    return folder, str(bad)


def test_truncated_image_is_dropped_by_collate_skip(with_truncated):
    root, bad = with_truncated
    ds = build_task("folder", root, eval_transform=transforms.ToTensor()).test.dataset
    index = [p for p, _ in ds.samples].index(bad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ds[index] is None and ds[index] is None
    assert len(caught) == 1 and bad in str(caught[0].message)  # warned once per file
    images, labels, n_bad = next(iter(DataLoader(ds, batch_size=len(ds), collate_fn=collate_skip)))
    assert n_bad == 1 and images.shape == (4, 3, 8, 8) and labels.tolist() == [0, 0, 1, 1]


def test_truncated_image_raises_when_strict(with_truncated):
    root, bad = with_truncated
    ds = build_task("folder", root, strict=True).test.dataset
    with pytest.raises(data.DataError, match=re.escape(bad)):
        ds[[p for p, _ in ds.samples].index(bad)]


def test_all_bad_batch_gives_empty_tensors(with_truncated):
    root, bad = with_truncated
    ds = build_task("folder", root, eval_transform=transforms.ToTensor()).test.dataset
    only_bad = Subset(ds, [[p for p, _ in ds.samples].index(bad)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images, labels, n_bad = next(iter(DataLoader(only_bad, batch_size=1, collate_fn=collate_skip)))
    assert n_bad == 1 and images.shape[0] == 0 and labels.shape == (0,)
    assert labels.dtype == torch.long
    images, labels, n_bad = collate_skip([None, None, None])
    assert (images.shape[0], labels.numel(), n_bad) == (0, 0, 3)


# ------------------------------------------------------------------------------ EvalSet


def test_evalset_rejects_both_projections():
    with pytest.raises(ValueError):
        data.EvalSet("x", [], class_index=torch.tensor([0]), class_groups=[[0]])
