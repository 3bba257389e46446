"""Bad input ends train.py, evaluate.py and bench.py with one line naming the flag or the path, never a
traceback: exit code 2 for flags, 1 for everything else (data trees, model, adapter and checkpoint files)."""

import dataclasses
import json
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import bench
import cli
import evaluate
import train
import train_seg
from clip_model import CLIP, PRESETS
from clip_weights import WeightsError, load_clip, save_clip

ROOT = Path(__file__).resolve().parents[1]


def argv(tree, tmp_path, *extra):
    return [
        "--data",
        "folder",
        "--data-root",
        str(tree),
        "--model",
        str(tree / "tiny.safetensors"),
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--run-dir",
        str(tmp_path / "runs"),
        *extra,
    ]


def refused(main, args, capsys):
    """(exit code, the message) of a main() that refused its input."""
    with pytest.raises(SystemExit) as e:
        main(args)
    code, err = e.value.code, capsys.readouterr().err.strip()
    message = code if isinstance(code, str) else err  # sys.exit(message) exits with 1 and prints it
    assert "Traceback" not in message and len(message.splitlines()) <= 2
    return (1 if isinstance(code, str) else code), message


def test_missing_data_root(tree, tmp_path, capsys):
    absent = tmp_path / "absent"
    assert refused(train.main, [*argv(tree, tmp_path), "--data-root", str(absent)], capsys) == (
        1,
        f"error: --data-root {absent}: folder not found",
    )


def test_val_missing_a_class_or_with_an_empty_class(tree, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tree, bad)
    shutil.rmtree(bad / "val" / "dog")
    code, message = refused(train.main, [*argv(tree, tmp_path), "--data-root", str(bad)], capsys)
    assert code == 1 and f"{bad / 'val'}: class folders differ" in message and "'dog'" in message
    (bad / "val" / "dog").mkdir()
    code, message = refused(train.main, [*argv(tree, tmp_path), "--data-root", str(bad)], capsys)
    assert code == 1 and f"{bad / 'val' / 'dog'}: class folder empty" in message


def test_model_that_is_not_a_clip_checkpoint(tree, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    code, message = refused(train.main, [*argv(tree, tmp_path), "--model", str(text)], capsys)
    assert code == 1 and f"{text}: cannot read it as a CLIP checkpoint" in message
    resnet = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, resnet)
    code, message = refused(train.main, [*argv(tree, tmp_path), "--model", str(resnet)], capsys)
    assert code == 1 and f"{resnet}: not a CLIP ViT state dict" in message


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--batch-size", "0"),
        ("--p", "1.0"),
        ("--shots", "0"),
        ("--method", "r-adaptr"),
        ("--min-lr", "0.1"),
        ("--accum-steps", "3"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(tree, tmp_path, capsys, flag, value):
    code, message = refused(train.main, [*argv(tree, tmp_path), flag, value], capsys)
    assert code == 2 and f"{flag} {value}" in message


BAD = {
    "batch_size": 0,
    "epochs": 0,
    "accum_steps": 0,
    "lr": 0.0,
    "warmup": -1,
    "p": 1.0,
    "m": 1.5,
    "shots": 0,
    "tau": 0.0,
    "epsilon": 1.0,
    "delta": -0.1,
    "alpha": 1.5,
    "save_every": 0,
    "log_every": 0,
    "rank": 0,
    "workers": -1,
    "min_lr": -1.0,
    "max_steps": 0,
    "seeds": 0,
    "grad_clip": -1.0,
    "weight_decay": -0.1,
    "iterations": 0,
    "crop": 0,
    "eval_size": 0,
    "eval_batch": 0,
    "clip_lr_scale": -1.0,
    "crop_scale": 0.0,
    "threads": 0,
}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(train.TrainConfig)}


def test_every_range_has_a_bad_value():
    assert set(BAD) == set(cli.RANGES)


@pytest.mark.parametrize("name", sorted(n for n in cli.RANGES if n in TRAIN_FIELDS))
def test_every_numeric_range_is_checked_before_anything_loads(name, capsys):
    flag = "--" + name.replace("_", "-")
    code, message = refused(
        train.parse_args, ["--data", "folder", "--data-root", "/nowhere", flag, str(BAD[name])], capsys
    )
    assert code == 2 and message.endswith(
        f"error: {flag} {BAD[name]}: expected {cli.RANGES[name][1]} (--help lists the flags)"
    )


@pytest.mark.parametrize("name", sorted(n for n in cli.RANGES if n in train_seg.SegConfig.__dataclass_fields__))
def test_every_numeric_range_of_train_seg_is_checked(name, capsys):
    flag = "--" + name.replace("_", "-")
    code, message = refused(train_seg.main, ["--data-root", "/nowhere", flag, str(BAD[name])], capsys)
    assert code == 2 and message.endswith(
        f"error: {flag} {BAD[name]}: expected {cli.RANGES[name][1]} (--help lists the flags)"
    )


def test_damaged_checkpoint_falls_back_once_then_names_the_file(tree, tmp_path, capsys):
    train.main(argv(tree, tmp_path, "--save-every", "1", "--method", "r-adapter", "--epochs", "2"))
    ckpt = tmp_path / "runs" / "r-adapter" / "checkpoint.pt"
    prev = ckpt.with_suffix(".prev.pt")
    assert torch.load(prev, weights_only=True)["step"] == torch.load(ckpt, weights_only=True)["step"] - 1
    blob = ckpt.read_bytes()
    ckpt.write_bytes(blob[: len(blob) // 2])  # cut in half
    train.main(
        argv(tree, tmp_path, "--save-every", "1", "--method", "r-adapter", "--epochs", "2", "--resume", "latest")
    )
    out = capsys.readouterr().out
    assert f"--resume: {ckpt} is unreadable" in out and f"resuming from {prev}" in out
    assert ckpt.with_suffix(".damaged.pt").read_bytes() == blob[: len(blob) // 2]  # kept aside, not rotated in
    assert torch.load(prev, weights_only=True)["step"] == 3 and torch.load(ckpt, weights_only=True)["step"] == 4
    ckpt.write_bytes(blob[: len(blob) // 2])
    prev.write_bytes(b"")
    code, message = refused(
        train.main, argv(tree, tmp_path, "--method", "r-adapter", "--epochs", "2", "--resume", "latest"), capsys
    )
    assert code == 1 and f"{prev} is not a readable checkpoint" in message


def test_resume_of_another_run_names_the_mismatch(tree, tmp_path, capsys):
    train.main(argv(tree, tmp_path, "--method", "r-adapter", "--max-steps", "1"))
    ckpt = tmp_path / "runs" / "r-adapter" / "checkpoint.pt"
    code, message = refused(train.main, argv(tree, tmp_path, "--method", "lora", "--resume", str(ckpt)), capsys)
    assert code == 1 and f"--resume {ckpt}: written by a run with --method r-adapter, this one has lora" in message


def test_resume_across_data_is_refused(train_args, tmp_path, capsys):
    train.main(train_args(tmp_path, "--method", "r-adapter", "--max-steps", "1", "--no-sweep"))
    ckpt = tmp_path / "r-adapter" / "checkpoint.pt"
    as_folder = [*train_args(tmp_path, "--method", "r-adapter", "--resume", "latest"), "--data", "folder"]
    code, message = refused(train.main, as_folder, capsys)
    assert code == 1 and f"--resume {ckpt}: written by a run with --data imagenet, this one has folder" in message


def test_resume_of_another_architecture_at_the_same_model_path_is_refused(tree, tmp_path, capsys):
    """The file behind --model was replaced by a CLIP of another size since the checkpoint was written."""
    model = tmp_path / "clip.safetensors"
    torch.manual_seed(0)
    save_clip(CLIP(PRESETS["tiny"]), model)
    flags = [*argv(tree, tmp_path, "--method", "r-adapter", "--max-steps", "1"), "--model", str(model)]
    train.main(flags)
    save_clip(CLIP(dataclasses.replace(PRESETS["tiny"], text_layers=PRESETS["tiny"].text_layers + 1)), model)
    code, message = refused(train.main, [*flags, "--resume", "latest"], capsys)
    ckpt = tmp_path / "runs" / "r-adapter" / "checkpoint.pt"
    assert code == 1 and f"--resume {ckpt}: written for another CLIP architecture than --model {model}" in message


class Payload:
    """Unpickling this runs open(marker, 'w'): any code that ran leaves the marker file behind."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_checkpoints_that_run_code_are_refused_and_the_code_never_runs(tree, tmp_path, capsys):
    marker = tmp_path / "pwned"
    state = tmp_path / "evil.pt"
    torch.save({"visual.conv1.weight": Payload(marker)}, state)
    with pytest.raises(WeightsError, match=f"{state}: cannot read it"):
        load_clip(state)
    script = tmp_path / "evil-torchscript.pt"
    with zipfile.ZipFile(script, "w") as archive:  # a TorchScript-style archive whose data.pkl carries the payload
        archive.writestr("evil/data.pkl", pickle.dumps({"w": Payload(marker)}))
        archive.writestr("evil/constants.pkl", pickle.dumps(()))
        archive.writestr("evil/code/__torch__.py", "")
    with pytest.raises(WeightsError, match=f"{script}: cannot read it"):
        load_clip(script)
    code, message = refused(train.main, [*argv(tree, tmp_path), "--resume", str(state)], capsys)
    assert code == 1 and f"{state} is not a readable checkpoint" in message
    assert not marker.exists()


def test_evaluate_refuses_bad_input_in_one_line(tree, tmp_path, capsys):
    base = ["--model", str(tree / "tiny.safetensors"), "--data", "folder", "--workers", "0"]
    assert refused(evaluate.main, [*base, "--data-root", str(tmp_path / "x")], capsys)[0] == 1
    code, message = refused(evaluate.main, [*base, "--data-root", str(tree), "--alpha", "2"], capsys)
    assert code == 2 and "--alpha 2" in message
    adapters = tmp_path / "adapters.safetensors"
    adapters.write_bytes(b"junk")
    code, message = refused(evaluate.main, [*base, "--data-root", str(tree), "--adapters", str(adapters)], capsys)
    assert code == 1 and str(adapters) in message


def test_a_real_process_prints_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--data",
            "imagenet",
            "--data-root",
            str(tmp_path / "nowhere"),
            "--model",
            "toy",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and proc.stderr == f"error: --data-root {tmp_path / 'nowhere'}: folder not found\n"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--batch-size", "0"], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2 and proc.stderr == (
        "train.py: error: --batch-size 0: expected >= 1 (--help lists the flags)\n"
    )


def one_line(main, args, capsys):
    """(exit code, the one line) of a main() that refused its input: exactly one line on stderr."""
    with pytest.raises(SystemExit) as e:
        main(args)
    code, err = e.value.code, capsys.readouterr().err
    if isinstance(code, str):  # sys.exit(message): the interpreter prints it to stderr and exits with 1
        code, err = 1, err + code + "\n"
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    return code, err.strip()


# The bad inputs a new user met (issue 21), each ending in one line.
@pytest.mark.parametrize("flag, value", [("--repeats", "-1"), ("--batch", "0"), ("--jpegs", "0")])
def test_bench_flags_out_of_range(flag, value, capsys):
    code, line = one_line(bench.main, [flag, value], capsys)
    assert code == 2 and line.endswith(f" error: {flag} {value}: expected >= 1 (--help lists the flags)")


@pytest.mark.parametrize("damage", ["truncated", "code"])
def test_damaged_checkpoint_names_the_file_and_the_first_clause_only(tree, tmp_path, capsys, damage):
    ckpt = tmp_path / "checkpoint.pt"
    if damage == "truncated":
        torch.save({"step": 1, "trainable": {"w": torch.zeros(1000)}}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:2000])
        cause = "RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory)"
    else:  # torch's message for this one advises weights_only=False, which would run the payload
        torch.save({"step": Payload(tmp_path / "pwned")}, ckpt)
        cause = "UnpicklingError: Weights only load failed)"
    code, line = one_line(train.main, argv(tree, tmp_path, "--method", "r-adapter", "--resume", str(ckpt)), capsys)
    assert code == 1 and line == f"error: --resume: {ckpt} is not a readable checkpoint ({cause}"
    assert "weights_only" not in line and not (tmp_path / "pwned").exists()


def test_evaluate_images_missing_or_classes_alone(tree, tmp_path, capsys):
    model = ["--model", str(tree / "tiny.safetensors")]
    missing = tmp_path / "photos"
    code, line = one_line(evaluate.main, [*model, "--images", str(missing), "--classes", "a,b"], capsys)
    assert (code, line) == (1, f"error: --images {missing}: no such file or folder")
    code, line = one_line(evaluate.main, [*model, "--classes", "a,b"], capsys)
    assert code == 2 and "--classes needs --images" in line


def test_cheap_checks_come_before_a_download(tree, tmp_path, capsys, offline):
    missing = tmp_path / "imagenett"  # a mistyped --data-root, and a model that would be downloaded
    args = ["--data", "imagenet", "--data-root", str(missing), "--model", "ViT-B-16"]
    assert one_line(train.main, args, capsys) == (1, f"error: --data-root {missing}: folder not found")
    assert one_line(evaluate.main, args, capsys) == (1, f"error: --data-root {missing}: folder not found")
    images = ["--model", "ViT-B-16", "--images", str(missing), "--classes", "a,b"]
    assert one_line(evaluate.main, images, capsys) == (1, f"error: --images {missing}: no such file or folder")
    resume = [*argv(tree, tmp_path, "--resume", str(missing / "checkpoint.pt")), "--model", "ViT-B-16"]
    assert one_line(train.main, resume, capsys) == (1, f"error: --resume {missing / 'checkpoint.pt'}: no such file")
    assert offline == []  # no download was attempted


def test_evaluate_images_on_a_folder_without_a_readable_image(tree, tmp_path, capsys):
    model = ["--model", str(tree / "tiny.safetensors"), "--classes", "a,b"]
    empty = tmp_path / "empty"
    empty.mkdir()
    code, line = one_line(evaluate.main, [*model, "--images", str(empty)], capsys)
    assert code == 1 and line.startswith(f"error: --images {empty}: no image in the folder (no .jpg/.jpeg/.png/")
    (empty / "notes.txt").write_text("not an image")
    assert one_line(evaluate.main, [*model, "--images", str(empty)], capsys) == (code, line)
    broken = empty / "photo.png"
    broken.write_bytes(b"\x89PNG not really")
    code, line = one_line(evaluate.main, [*model, "--images", str(empty)], capsys)
    assert code == 1 and line.startswith("error: ") and str(broken) in line


def test_a_dataset_split_with_no_image_names_its_file(tmp_path, capsys):
    """A CoOp split file whose train (or test) list is empty: one line naming the file, exit 1."""
    root = tmp_path / "data"
    (root / "dtd" / "images" / "banded").mkdir(parents=True)
    split = root / "dtd" / "split_zhou_DescribableTextures.json"
    for empty in ("train", "test"):
        listed = [["banded/0.png", 0, "banded"]]
        split.write_text(
            json.dumps({"train": [] if empty == "train" else listed, "test": [] if empty == "test" else listed})
        )
        Image.new("RGB", (8, 8)).save(root / "dtd" / "images" / "banded" / "0.png")
        args = ["--data", "dtd", "--data-root", str(root), "--model", "toy", "--method", "zero-shot"]
        code, line = one_line(train.main, [*args, "--run-dir", str(tmp_path / "runs")], capsys)
        assert code == 1 and line.startswith(f"error: {split}: no {empty} images listed; --data dtd expects")
