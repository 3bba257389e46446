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


# ---------------------------------------------------------------------------- tables
# The 1000 ILSVRC-2012 wnids, sorted (= torchvision ImageFolder / open_clip class order).
# Source: timm's packaged data/_info/imagenet_synsets.txt; consistent with WiSE-FT through the
# subsets below, and spot-checked against the common imagenet_class_index.json.
IMAGENET_WNIDS = """
n01440764 n01443537 n01484850 n01491361 n01494475 n01496331 n01498041 n01514668
n01514859 n01518878 n01530575 n01531178 n01532829 n01534433 n01537544 n01558993
n01560419 n01580077 n01582220 n01592084 n01601694 n01608432 n01614925 n01616318
n01622779 n01629819 n01630670 n01631663 n01632458 n01632777 n01641577 n01644373
n01644900 n01664065 n01665541 n01667114 n01667778 n01669191 n01675722 n01677366
n01682714 n01685808 n01687978 n01688243 n01689811 n01692333 n01693334 n01694178
n01695060 n01697457 n01698640 n01704323 n01728572 n01728920 n01729322 n01729977
n01734418 n01735189 n01737021 n01739381 n01740131 n01742172 n01744401 n01748264
n01749939 n01751748 n01753488 n01755581 n01756291 n01768244 n01770081 n01770393
n01773157 n01773549 n01773797 n01774384 n01774750 n01775062 n01776313 n01784675
n01795545 n01796340 n01797886 n01798484 n01806143 n01806567 n01807496 n01817953
n01818515 n01819313 n01820546 n01824575 n01828970 n01829413 n01833805 n01843065
n01843383 n01847000 n01855032 n01855672 n01860187 n01871265 n01872401 n01873310
n01877812 n01882714 n01883070 n01910747 n01914609 n01917289 n01924916 n01930112
n01943899 n01944390 n01945685 n01950731 n01955084 n01968897 n01978287 n01978455
n01980166 n01981276 n01983481 n01984695 n01985128 n01986214 n01990800 n02002556
n02002724 n02006656 n02007558 n02009229 n02009912 n02011460 n02012849 n02013706
n02017213 n02018207 n02018795 n02025239 n02027492 n02028035 n02033041 n02037110
n02051845 n02056570 n02058221 n02066245 n02071294 n02074367 n02077923 n02085620
n02085782 n02085936 n02086079 n02086240 n02086646 n02086910 n02087046 n02087394
n02088094 n02088238 n02088364 n02088466 n02088632 n02089078 n02089867 n02089973
n02090379 n02090622 n02090721 n02091032 n02091134 n02091244 n02091467 n02091635
n02091831 n02092002 n02092339 n02093256 n02093428 n02093647 n02093754 n02093859
n02093991 n02094114 n02094258 n02094433 n02095314 n02095570 n02095889 n02096051
n02096177 n02096294 n02096437 n02096585 n02097047 n02097130 n02097209 n02097298
n02097474 n02097658 n02098105 n02098286 n02098413 n02099267 n02099429 n02099601
n02099712 n02099849 n02100236 n02100583 n02100735 n02100877 n02101006 n02101388
n02101556 n02102040 n02102177 n02102318 n02102480 n02102973 n02104029 n02104365
n02105056 n02105162 n02105251 n02105412 n02105505 n02105641 n02105855 n02106030
n02106166 n02106382 n02106550 n02106662 n02107142 n02107312 n02107574 n02107683
n02107908 n02108000 n02108089 n02108422 n02108551 n02108915 n02109047 n02109525
n02109961 n02110063 n02110185 n02110341 n02110627 n02110806 n02110958 n02111129
n02111277 n02111500 n02111889 n02112018 n02112137 n02112350 n02112706 n02113023
n02113186 n02113624 n02113712 n02113799 n02113978 n02114367 n02114548 n02114712
n02114855 n02115641 n02115913 n02116738 n02117135 n02119022 n02119789 n02120079
n02120505 n02123045 n02123159 n02123394 n02123597 n02124075 n02125311 n02127052
n02128385 n02128757 n02128925 n02129165 n02129604 n02130308 n02132136 n02133161
n02134084 n02134418 n02137549 n02138441 n02165105 n02165456 n02167151 n02168699
n02169497 n02172182 n02174001 n02177972 n02190166 n02206856 n02219486 n02226429
n02229544 n02231487 n02233338 n02236044 n02256656 n02259212 n02264363 n02268443
n02268853 n02276258 n02277742 n02279972 n02280649 n02281406 n02281787 n02317335
n02319095 n02321529 n02325366 n02326432 n02328150 n02342885 n02346627 n02356798
n02361337 n02363005 n02364673 n02389026 n02391049 n02395406 n02396427 n02397096
n02398521 n02403003 n02408429 n02410509 n02412080 n02415577 n02417914 n02422106
n02422699 n02423022 n02437312 n02437616 n02441942 n02442845 n02443114 n02443484
n02444819 n02445715 n02447366 n02454379 n02457408 n02480495 n02480855 n02481823
n02483362 n02483708 n02484975 n02486261 n02486410 n02487347 n02488291 n02488702
n02489166 n02490219 n02492035 n02492660 n02493509 n02493793 n02494079 n02497673
n02500267 n02504013 n02504458 n02509815 n02510455 n02514041 n02526121 n02536864
n02606052 n02607072 n02640242 n02641379 n02643566 n02655020 n02666196 n02667093
n02669723 n02672831 n02676566 n02687172 n02690373 n02692877 n02699494 n02701002
n02704792 n02708093 n02727426 n02730930 n02747177 n02749479 n02769748 n02776631
n02777292 n02782093 n02783161 n02786058 n02787622 n02788148 n02790996 n02791124
n02791270 n02793495 n02794156 n02795169 n02797295 n02799071 n02802426 n02804414
n02804610 n02807133 n02808304 n02808440 n02814533 n02814860 n02815834 n02817516
n02823428 n02823750 n02825657 n02834397 n02835271 n02837789 n02840245 n02841315
n02843684 n02859443 n02860847 n02865351 n02869837 n02870880 n02871525 n02877765
n02879718 n02883205 n02892201 n02892767 n02894605 n02895154 n02906734 n02909870
n02910353 n02916936 n02917067 n02927161 n02930766 n02939185 n02948072 n02950826
n02951358 n02951585 n02963159 n02965783 n02966193 n02966687 n02971356 n02974003
n02977058 n02978881 n02979186 n02980441 n02981792 n02988304 n02992211 n02992529
n02999410 n03000134 n03000247 n03000684 n03014705 n03016953 n03017168 n03018349
n03026506 n03028079 n03032252 n03041632 n03042490 n03045698 n03047690 n03062245
n03063599 n03063689 n03065424 n03075370 n03085013 n03089624 n03095699 n03100240
n03109150 n03110669 n03124043 n03124170 n03125729 n03126707 n03127747 n03127925
n03131574 n03133878 n03134739 n03141823 n03146219 n03160309 n03179701 n03180011
n03187595 n03188531 n03196217 n03197337 n03201208 n03207743 n03207941 n03208938
n03216828 n03218198 n03220513 n03223299 n03240683 n03249569 n03250847 n03255030
n03259280 n03271574 n03272010 n03272562 n03290653 n03291819 n03297495 n03314780
n03325584 n03337140 n03344393 n03345487 n03347037 n03355925 n03372029 n03376595
n03379051 n03384352 n03388043 n03388183 n03388549 n03393912 n03394916 n03400231
n03404251 n03417042 n03424325 n03425413 n03443371 n03444034 n03445777 n03445924
n03447447 n03447721 n03450230 n03452741 n03457902 n03459775 n03461385 n03467068
n03476684 n03476991 n03478589 n03481172 n03482405 n03483316 n03485407 n03485794
n03492542 n03494278 n03495258 n03496892 n03498962 n03527444 n03529860 n03530642
n03532672 n03534580 n03535780 n03538406 n03544143 n03584254 n03584829 n03590841
n03594734 n03594945 n03595614 n03598930 n03599486 n03602883 n03617480 n03623198
n03627232 n03630383 n03633091 n03637318 n03642806 n03649909 n03657121 n03658185
n03661043 n03662601 n03666591 n03670208 n03673027 n03676483 n03680355 n03690938
n03691459 n03692522 n03697007 n03706229 n03709823 n03710193 n03710637 n03710721
n03717622 n03720891 n03721384 n03724870 n03729826 n03733131 n03733281 n03733805
n03742115 n03743016 n03759954 n03761084 n03763968 n03764736 n03769881 n03770439
n03770679 n03773504 n03775071 n03775546 n03776460 n03777568 n03777754 n03781244
n03782006 n03785016 n03786901 n03787032 n03788195 n03788365 n03791053 n03792782
n03792972 n03793489 n03794056 n03796401 n03803284 n03804744 n03814639 n03814906
n03825788 n03832673 n03837869 n03838899 n03840681 n03841143 n03843555 n03854065
n03857828 n03866082 n03868242 n03868863 n03871628 n03873416 n03874293 n03874599
n03876231 n03877472 n03877845 n03884397 n03887697 n03888257 n03888605 n03891251
n03891332 n03895866 n03899768 n03902125 n03903868 n03908618 n03908714 n03916031
n03920288 n03924679 n03929660 n03929855 n03930313 n03930630 n03933933 n03935335
n03937543 n03938244 n03942813 n03944341 n03947888 n03950228 n03954731 n03956157
n03958227 n03961711 n03967562 n03970156 n03976467 n03976657 n03977966 n03980874
n03982430 n03983396 n03991062 n03992509 n03995372 n03998194 n04004767 n04005630
n04008634 n04009552 n04019541 n04023962 n04026417 n04033901 n04033995 n04037443
n04039381 n04040759 n04041544 n04044716 n04049303 n04065272 n04067472 n04069434
n04070727 n04074963 n04081281 n04086273 n04090263 n04099969 n04111531 n04116512
n04118538 n04118776 n04120489 n04125021 n04127249 n04131690 n04133789 n04136333
n04141076 n04141327 n04141975 n04146614 n04147183 n04149813 n04152593 n04153751
n04154565 n04162706 n04179913 n04192698 n04200800 n04201297 n04204238 n04204347
n04208210 n04209133 n04209239 n04228054 n04229816 n04235860 n04238763 n04239074
n04243546 n04251144 n04252077 n04252225 n04254120 n04254680 n04254777 n04258138
n04259630 n04263257 n04264628 n04265275 n04266014 n04270147 n04273569 n04275548
n04277352 n04285008 n04286575 n04296562 n04310018 n04311004 n04311174 n04317175
n04325704 n04326547 n04328186 n04330267 n04332243 n04335435 n04336792 n04344873
n04346328 n04347754 n04350905 n04355338 n04355933 n04356056 n04357314 n04366367
n04367480 n04370456 n04371430 n04371774 n04372370 n04376876 n04380533 n04389033
n04392985 n04398044 n04399382 n04404412 n04409515 n04417672 n04418357 n04423845
n04428191 n04429376 n04435653 n04442312 n04443257 n04447861 n04456115 n04458633
n04461696 n04462240 n04465501 n04467665 n04476259 n04479046 n04482393 n04483307
n04485082 n04486054 n04487081 n04487394 n04493381 n04501370 n04505470 n04507155
n04509417 n04515003 n04517823 n04522168 n04523525 n04525038 n04525305 n04532106
n04532670 n04536866 n04540053 n04542943 n04548280 n04548362 n04550184 n04552348
n04553703 n04554684 n04557648 n04560804 n04562935 n04579145 n04579432 n04584207
n04589890 n04590129 n04591157 n04591713 n04592741 n04596742 n04597913 n04599235
n04604644 n04606251 n04612504 n04613696 n06359193 n06596364 n06785654 n06794110
n06874185 n07248320 n07565083 n07579787 n07583066 n07584110 n07590611 n07613480
n07614500 n07615774 n07684084 n07693725 n07695742 n07697313 n07697537 n07711569
n07714571 n07714990 n07715103 n07716358 n07716906 n07717410 n07717556 n07718472
n07718747 n07720875 n07730033 n07734744 n07742313 n07745940 n07747607 n07749582
n07753113 n07753275 n07753592 n07754684 n07760859 n07768694 n07802026 n07831146
n07836838 n07860988 n07871810 n07873807 n07875152 n07880968 n07892512 n07920052
n07930864 n07932039 n09193705 n09229709 n09246464 n09256479 n09288635 n09332890
n09399592 n09421951 n09428293 n09468604 n09472597 n09835506 n10148035 n10565667
n11879895 n11939491 n12057211 n12144580 n12267677 n12620546 n12768682 n12985857
n12998815 n13037406 n13040303 n13044778 n13052670 n13054560 n13133613 n15075141
""".split()

# ImageNet-R's and ImageNet-A's 200 classes as indices into IMAGENET_WNIDS. Source: WiSE-FT
# src/datasets/imagenet_{r,a}.py CLASS_SUBLIST, identical to timm's imagenet_{r,a}_indices.txt,
# whose imagenet_{r,a}_synsets.txt are exactly these wnids.
IMAGENET_R_INDICES = [
    int(i)
    for i in """
1 2 4 6 8 9 11 13 22 23 26 29 31 39 47 63 71 76 79 84 90 94 96 97 99 100 105 107 113
122 125 130 132 144 145 147 148 150 151 155 160 161 162 163 171 172 178 187 195 199
203 207 208 219 231 232 234 235 242 245 247 250 251 254 259 260 263 265 267 269 276
277 281 288 289 291 292 293 296 299 301 308 309 310 311 314 315 319 323 327 330 334
335 337 338 340 341 344 347 353 355 361 362 365 366 367 368 372 388 390 393 397 401
407 413 414 425 428 430 435 437 441 447 448 457 462 463 469 470 471 472 476 483 487
515 546 555 558 570 579 583 587 593 594 596 609 613 617 621 629 637 657 658 701 717
724 763 768 774 776 779 780 787 805 812 815 820 824 833 847 852 866 875 883 889 895
907 928 931 932 933 934 936 937 943 945 947 948 949 951 953 954 957 963 965 967 980
981 983 988
""".split()
]
IMAGENET_A_INDICES = [
    int(i)
    for i in """
6 11 13 15 17 22 23 27 30 37 39 42 47 50 57 70 71 76 79 89 90 94 96 97 99 105 107
108 110 113 124 125 130 132 143 144 150 151 207 234 235 254 277 283 287 291 295 298
301 306 307 308 309 310 311 313 314 315 317 319 323 324 326 327 330 334 335 336 347
361 363 372 378 386 397 400 401 402 404 407 411 416 417 420 425 428 430 437 438 445
456 457 461 462 470 472 483 486 488 492 496 514 516 528 530 539 542 543 549 552 557
561 562 569 572 573 575 579 589 606 607 609 614 626 627 640 641 642 643 658 668 677
682 684 687 701 704 719 736 746 749 752 758 763 765 768 773 774 776 779 780 786 792
797 802 803 804 813 815 820 823 831 833 835 839 845 847 850 859 862 870 879 880 888
890 897 900 907 913 924 932 933 934 937 943 945 947 951 954 956 957 959 971 972 980
981 984 986 987 988
""".split()
]

_WNID_INDEX = {w: i for i, w in enumerate(IMAGENET_WNIDS)}
