"""One model resolver (clip_weights.load_clip) behind every entry point: train.py, evaluate.py, bench.py
and the Python API each take `toy`, a file, an OpenAI name and ARCH:TAG. Offline, a name fails at once
with the URL and where to put the file."""

from pathlib import Path

import pytest
import torch

import bench
import clip_weights
import evaluate
import train
from clip_model import CLIP, PRESETS
from clip_weights import TOY_CLIP, WeightsError, load_clip, load_toy_clip, save_clip

NAMES = {"ViT-B-16": "openaipublic.azureedge.net", "ViT-B-32:laion2b_s34b_b79k": "huggingface.co"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny preset's random weights as a safetensors file and as a torch state dict."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = CLIP(PRESETS["tiny"])
    save_clip(model, root / "tiny.safetensors")
    save_clip(model, root / "tiny.pt")
    return {"safetensors": root / "tiny.safetensors", "pt": root / "tiny.pt"}


def entry_points(tree, tmp_path):
    """{entry point: model -> runs it with --model model}: each reads or times a little."""
    data = ["--data", "folder", "--data-root", str(tree), "--workers", "0"]
    images = ["--images", str(tree / "val" / "cat"), "--classes", "a,b"]
    return {
        "train.py": lambda m: train.main(
            [*data, "--model", m, "--method", "zero-shot", "--run-dir", str(tmp_path / Path(m).name)]
        ),
        "evaluate.py": lambda m: evaluate.main(["--model", m, *images]),
        "bench.py": lambda m: bench.main(["--model", m, "--repeats", "1", "--batch", "2", "--device", "cpu"]),
        "load_clip": lambda m: load_clip(m),
    }


@pytest.mark.parametrize("entry", ["train.py", "evaluate.py", "bench.py", "load_clip"])
def test_every_entry_point_takes_toy_and_files(entry, tree, files, tmp_path, capsys):
    run = entry_points(tree, tmp_path)[entry]
    for model in ("toy", str(files["safetensors"]), str(files["pt"])):
        run(model)
    assert torch.is_grad_enabled()  # bench.main leaves the process as it found it
    out = capsys.readouterr().out
    if entry == "evaluate.py":  # one line of top classes per image
        assert out.count(str(tree / "val" / "cat")) == 3 * 2
    if entry == "bench.py":
        assert f"R-Adapter {files['pt']} b2 cpu" in out and "R-Adapter toy b2 cpu" in out


@pytest.mark.parametrize("entry", ["train.py", "evaluate.py", "bench.py", "load_clip"])
@pytest.mark.parametrize("name", NAMES)
def test_every_entry_point_takes_names_and_fails_at_once_offline(entry, name, tree, tmp_path, capsys, offline):
    run = entry_points(tree, tmp_path)[entry]
    if entry == "load_clip":
        with pytest.raises(WeightsError) as e:
            run(name)
        message = str(e.value)
    else:
        with pytest.raises(SystemExit) as e:
            run(name)
        message = e.value.code
    assert message.startswith(f"error: --model {name}: cannot download https://" if entry != "load_clip" else "--model")
    assert f"(no network to {NAMES[name]}); download it to {clip_weights.CACHE_DIR}" in message
    assert message.endswith("or pass the file's path: --model PATH")
    assert offline == [NAMES[name]]  # one try, before any data was read


def test_toy_is_the_checked_shipped_file():
    assert load_clip("toy").state_dict().keys() == load_toy_clip().state_dict().keys()
    a, b = load_clip("toy").state_dict(), load_clip(TOY_CLIP).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_unknown_name_lists_the_names(tree, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", "ViT-B-61", "--images", str(tree / "val" / "cat"), "--classes", "a,b"])
    assert e.value.code.startswith("error: --model 'ViT-B-61': no such file, and not a known model name (toy, ")
    assert all(f"'{name}'" in e.value.code for name in ("ViT-B-16", "ViT-B-32", "ViT-L-14"))
