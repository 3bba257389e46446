"""Every documented command resolves to the released recipe (recipes.py), checked through train.parse_args;
--print-config and --config (cli.py)."""

import csv
import dataclasses
import json
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
from torchvision.transforms import RandomResizedCrop

import cli
import recipes
import toy_experiments
import train
from clip_model import PRESETS

ROOT = Path(__file__).resolve().parents[1]
FIELDS = (
    "epochs",
    "batch_size",
    "lr",
    "warmup",
    "warmup_epochs",
    "optimizer",
    "grad_clip",
    "prompts",
    "eval_prompts",
    "alpha",
)
PAPER = dict(
    epochs=10,
    batch_size=512,
    lr=5e-4,
    warmup=500,
    warmup_epochs=None,
    optimizer="adamw",
    grad_clip=1.0,
    prompts="task",
    eval_prompts="task",
    alpha=0.5,
)
CLIPFIT = dict(batch_size=32, lr=0.002, warmup=500, warmup_epochs=1, optimizer="sgd", grad_clip=0.0, alpha=0.5)
B2N = dict(PAPER, epochs=101, batch_size=32, prompts="imagenet-80", eval_prompts="imagenet-80")

# (README command, method, expected values) -- the sources are in recipes.py
CASES = [
    ("--data imagenet", "r-adapter", PAPER),
    (
        "--data imagenet --shots 16 --method r-adapter,clipfit",
        "r-adapter",
        dict(PAPER, epochs=50, batch_size=256, warmup=0, prompts="a photo of a {}"),
    ),
    (
        "--data imagenet --shots 16 --method r-adapter,clipfit",
        "clipfit",
        dict(CLIPFIT, epochs=10, prompts="a photo of a {}.", eval_prompts="a photo of a {}."),
    ),
    ("--data dtd --shots 16 --split base --method r-adapter,clipfit", "r-adapter", B2N),
    (
        "--data dtd --shots 16 --split base --method r-adapter,clipfit",
        "clipfit",
        dict(
            CLIPFIT,
            epochs=100,
            prompts="a photo of a {}, a type of texture.",
            eval_prompts="a photo of a {}, a type of texture.",
        ),
    ),
    ("--data eurosat --shots 16 --split base --method r-adapter,clipfit", "r-adapter", B2N),
    (
        "--data eurosat --shots 16 --split base --method r-adapter,clipfit",
        "clipfit",
        dict(CLIPFIT, epochs=100, prompts="task", eval_prompts="task"),
    ),
    (
        "--data imagenet --shots 16 --method clipfit",
        "clipfit",
        dict(CLIPFIT, epochs=10, prompts="a photo of a {}.", eval_prompts="a photo of a {}."),
    ),
    (
        "--data food101 --shots 16 --method clipfit",
        "clipfit",
        dict(CLIPFIT, epochs=10, prompts="task", eval_prompts="task"),
    ),
    (
        "--data eurosat --shots 16 --method clipfit",
        "clipfit",
        dict(CLIPFIT, epochs=100, prompts="task", eval_prompts="task"),
    ),
    ("--data coco", "r-adapter", dict(PAPER, grad_clip=0.0, alpha=0.8)),
    # WiSE-FT's end-to-end fine-tuning: AdamW 3e-5, batch 512, 10 epochs, 500 warm-up steps, clipping 1.0
    ("--data imagenet --method full-ft,wise-ft", "full-ft", dict(PAPER, lr=3e-5)),
    ("--data imagenet --method full-ft,wise-ft", "wise-ft", dict(PAPER, lr=3e-5)),
]


@pytest.mark.parametrize("command, method, expected", CASES, ids=[f"{c} [{m}]" for c, m, _ in CASES])
def test_documented_command_resolves_to_the_released_recipe(command, method, expected):
    cfgs = {c.method: c for c in train.parse_args([*command.split(), "--data-root", "DIR"])}
    assert {k: getattr(cfgs[method], k) for k in FIELDS} == expected


def test_full_ft_prints_wise_fts_imagenet_recipe():
    out = subprocess.run(
        [sys.executable, "train.py", "--data", "imagenet", "--data-root", "X", "--method", "full-ft", "--print-config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    values = {line.split()[0]: line.split()[1] for line in out.splitlines() if line and not line.startswith("#")}
    expected = dict(lr="3e-05", weight_decay="0.1", batch_size="512", epochs="10", warmup="500", loss='"ce"')
    assert {k: values[k] for k in expected} == expected and float(values["min_lr"]) == 0.0


def test_toy_lrs_are_the_selection_tables_argmax():
    """The toy recipe's learning rates are the argmax rows of the committed lr-selection table
    (photo validation accuracy over one grid, recipes.lr_rule); wise-ft trains as full-ft."""
    table = toy_experiments.selected_lrs()
    assert set(table) == {"full-ft", toy_experiments.BLOCKS_ONLY, "r-adapter"}
    for method in ("full-ft", "r-adapter"):
        (cfg,) = train.parse_args(["--method", method])
        assert cfg.lr == table[method], method
    (wise,) = train.parse_args(["--method", "wise-ft"])
    assert wise.lr == table["full-ft"]
    assert_argmax_of_the_grid(None, table)


def test_toy_base_to_new_lrs_are_the_selection_tables_argmax():
    """The same for `--data toy-specialised --split base`: its table scores base-class validation images only."""
    table = toy_experiments.selected_lrs("base")
    assert set(table) == set(recipes.TOY_B2N_LR) == {"coop", "cocoop", "clipfit", "r-adapter"}
    for cfg in train.parse_args(["--data", "toy-specialised", "--split", "base", "--method", ",".join(table)]):
        assert cfg.lr == table[cfg.method], cfg.method
    assert_argmax_of_the_grid("base", table)


def assert_argmax_of_the_grid(split, table):
    """Every lr of the grid was tried for every method of the table, and the selected one scored highest."""
    with open(toy_experiments.LR_TABLES[split]) as f:
        rows = list(csv.DictReader(f))
    for method in table:
        scores = {float(r["lr"]): float(r["val_top1"]) for r in rows if r["method"] == method}
        assert sorted(scores) == sorted(recipes.LR_GRID) and scores[table[method]] == max(scores.values())


def test_the_rest_of_each_setting():
    (ra,) = train.parse_args(["--data", "dtd", "--data-root", "DIR", "--shots", "16", "--split", "base"])
    assert (ra.m, ra.delta, ra.epsilon, ra.rank) == (0.9, 0.1, 0.0, 4)  # base-to-novel script
    (full,) = train.parse_args(["--data", "dtd", "--data-root", "DIR", "--split", "base", "--rank", "full"])
    assert full.rank is None  # the paper's full rank, by flag
    fit = {
        c.data: c.clipfit_lambda
        for c in (
            train.parse_args(["--data", d, "--data-root", "D", "--shots", "16", "--method", "clipfit"])[0]
            for d in ("dtd", "sun397", "eurosat", "food101")
        )
    }
    assert fit == {"dtd": 8.0, "sun397": 8.0, "eurosat": 2.0, "food101": 2.0}
    (coco,) = train.parse_args(["--data", "coco", "--data-root", "D"])
    assert (coco.epsilon, coco.delta) == (0.0, 0.05)
    (given,) = train.parse_args(["--data", "coco", "--data-root", "D", "--grad-clip", "1", "--alpha", "0.5"])
    assert (given.grad_clip, given.alpha) == (1.0, 0.5)  # flags given always win


def printed(text):
    """--print-config's output -> {method: {field: (value, source)}} and {method: its header line}."""
    fields, headers = {}, {}
    for block in text.strip().split("\n\n"):
        header, *lines = block.splitlines()
        method = header.removeprefix("# ").split(":")[0]
        headers[method] = header
        fields[method] = {}
        for line in lines:
            name, value, source = re.split(r"\s{2,}", line, maxsplit=2)
            fields[method][name] = (json.loads(value), source)
    return fields, headers


def print_config(*argv, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *argv, "--print-config"], capture_output=True, text=True, cwd=cwd
    )


def test_print_config_reads_nothing_and_counts_templates(tmp_path):
    missing = tmp_path / "not-there"
    argv = ["--data", "imagenet", "--data-root", str(missing), "--shots", "16", "--method", "r-adapter,clipfit"]
    proc = print_config(*argv, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == f"warning: --data-root {missing}: folder not found\n"
    fields, headers = printed(proc.stdout)
    ra, fit = fields["r-adapter"], fields["clipfit"]
    assert [ra[k][0] for k in ("method", "epochs", "batch_size", "warmup")] == ["r-adapter", 50, 256, 0]
    assert headers["r-adapter"] == "# r-adapter: 1 training templates, 80 evaluation templates"
    assert headers["clipfit"] == "# clipfit: 1 training templates, 1 evaluation templates"
    assert (fit["epochs"][0], fit["optimizer"][0]) == (10, "sgd")
    assert set(ra) == {f.name for f in dataclasses.fields(train.TrainConfig)}
    assert not missing.exists() and not (tmp_path / "runs").exists()


def test_print_config_names_each_source(tmp_path):
    argv = ["--data", "dtd", "--data-root", str(tmp_path), "--shots", "16", "--split", "base"]
    proc = print_config(*argv, "--method", "r-adapter,clipfit", "--epochs", "7", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""  # the root exists: no warning
    fields, _ = printed(proc.stdout)
    ra, fit = fields["r-adapter"], fields["clipfit"]
    assert ra["data"] == fit["data"] == ("dtd", "flag")
    assert ra["epochs"] == fit["epochs"] == (7, "flag")
    assert ra["p"] == (0.2, "default")
    assert ra["m"] == (0.9, recipes.B2N["m"][1])  # the setting's values, under each method's own recipe
    assert ra["rank"] == recipes.RECIPES["base-to-novel", "r-adapter"]["rank"]
    assert fit["optimizer"] == recipes.OWN["clipfit"]["optimizer"]
    assert fit["prompts"] == recipes.DATASETS["dtd", "clipfit"]["prompts"]  # the dataset's exception wins
    assert fit["clipfit_lambda"] == (8.0, "CLIPFit paper: lambda 8 on DTD")


@pytest.mark.parametrize("method", train.METHODS)
def test_the_toy_budget_holds_for_every_method(method):
    (cfg,) = train.parse_args(["--method", method])
    assert {k: getattr(cfg, k) for k in recipes.TOY_BUDGET} == {k: v for k, (v, _) in recipes.TOY_BUDGET.items()}
    (_, sources), *_ = cli.resolve([("flag", {"method": method})], asdict(train.TrainConfig()), recipes.recipe)
    assert {k: sources[k] for k in recipes.TOY_BUDGET} == {k: s for k, (_, s) in recipes.TOY_BUDGET.items()}


def test_the_toy_base_to_new_job():
    """`--data toy-specialised --split base`: five methods, 16 shots, one budget over each method's own recipe
    (CoCoOp's batch 1 included), R-Adapter at the base-to-novel rank, its own run folder."""
    cfgs = train.parse_args(["--data", "toy-specialised", "--split", "base"])
    assert [c.method for c in cfgs] == ["zero-shot", "coop", "cocoop", "clipfit", "r-adapter"]
    budget = {k: v for k, (v, _) in recipes.TOY_B2N_BUDGET.items()}
    for cfg in cfgs:
        assert {k: getattr(cfg, k) for k in budget} == budget
        assert (cfg.shots, cfg.model, cfg.run_dir, cfg.sweep) == (16, "toy", "runs/toy-b2n", False)
    by = {c.method: c for c in cfgs}
    assert by["r-adapter"].rank == 4 and (by["r-adapter"].delta, by["r-adapter"].epsilon) == (0.1, 0.0)
    assert (by["coop"].optimizer, by["cocoop"].warmup_epochs) == ("sgd", 1)  # Dassl's, under the budget
    assert by["clipfit"].prompts == by["clipfit"].eval_prompts == "a photo of the {}."
    command = [("flag", {"method": "cocoop", "split": "base"})]
    (_, sources), *_ = cli.resolve(command, asdict(train.TrainConfig()), recipes.recipe)
    assert {k: sources[k] for k in recipes.TOY_B2N_BUDGET} == {k: s for k, (_, s) in recipes.TOY_B2N_BUDGET.items()}


def test_docs_recipe_table_is_recipes_table():
    """docs/recipes.md shows `python recipes.py`'s table; every method has a recipe in every setting,
    and every value of every recipe carries its source."""
    assert recipes.table() in (ROOT / "docs" / "recipes.md").read_text()
    assert set(recipes.OWN) == set(train.METHODS)
    settings = {setting for setting, _ in recipes.RECIPES}
    assert set(recipes.RECIPES) == {(s, m) for s in settings for m in train.METHODS}
    fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    for recipe in [*recipes.RECIPES.values(), *recipes.DATASETS.values()]:
        for name, entry in recipe.items():
            by_shots = entry.values() if isinstance(entry, dict) else [entry]  # {K: (value, source)} by --shots
            assert name in fields and all(isinstance(e, tuple) and len(e) == 2 for e in by_shots), (name, entry)
            assert all(isinstance(source, str) and source for _, source in by_shots), name


def test_a_command_runs_one_recipe_per_method():
    """The rule: TrainConfig's default < RECIPES[setting, method] < DATASETS[data, method] < --config < flags,
    checked on a command that meets each: a value of the setting's recipe, the dataset's over it, a flag over
    both, and a field nothing sets."""
    (fit,) = train.parse_args(["--data", "dtd", "--data-root", "D", "--shots", "4", "--method", "clipfit", "--lr", "1"])
    setting = recipes.RECIPES["few-shot", "clipfit"]
    assert fit.epochs == setting["epochs"][0] == 100 and fit.batch_size == setting["batch_size"][0]
    assert fit.clipfit_lambda == recipes.DATASETS["dtd", "clipfit"]["clipfit_lambda"][0] != setting["clipfit_lambda"][0]
    assert fit.lr == 1.0 and fit.p == train.TrainConfig.p


def test_the_dassl_family_trains_on_dassls_schedule_and_crop(tree):
    """CoOp, CoCoOp and CLIPFit: Dassl's per-epoch schedule and RandomResizedCrop(scale=(0.08, 1)) reach the
    training transform; R-Adapter keeps its per-step cosine and (0.9, 1)."""
    argv = ["--data", "folder", "--data-root", str(tree), "--method", "coop,cocoop,clipfit,r-adapter"]
    model = SimpleNamespace(config=PRESETS["tiny"])
    for cfg in train.parse_args(argv):
        task, _ = train.build_data(cfg, model)
        (crop,) = [t for t in task.train.transform.transforms if isinstance(t, RandomResizedCrop)]
        dassl = cfg.method != "r-adapter"
        assert crop.scale == ((0.08, 1.0) if dassl else (0.9, 1.0)), cfg.method
        assert cfg.schedule == ("dassl" if dassl else "cosine"), cfg.method


@pytest.mark.parametrize("shots, epochs", [(1, 50), (2, 100), (3, 100), (4, 100), (8, 200), (16, 200), (32, 200)])
def test_coops_few_shot_recipe_is_the_releases(shots, epochs):
    """CoOp's few-shot tables as released (COOP.md, scripts/coop/main.sh): 16 random context vectors, 50 epochs
    for 1 shot, 100 for 2 and 4, 200 for 8 and 16 (ImageNet: 50 for every shot count), seeds 1, 2, 3 pooled."""
    (coop,) = train.parse_args(["--data", "dtd", "--data-root", "D", "--shots", str(shots), "--method", "coop"])
    assert (coop.ctx_init, coop.epochs, coop.seed, coop.seeds) == ("16", epochs, 1, 3)
    argv = ["--data", "imagenet", "--data-root", "D", "--shots", str(shots), "--method", "coop"]
    assert train.parse_args(argv)[0].epochs == 50


def test_print_config_shows_dassls_recipe_with_release_files(tmp_path):
    """The Dassl family in the few-shot and base-to-new settings: Dassl's schedule and crop, CoOp's 16 context
    vectors (few-shot; base-to-new starts from "a photo of a", as its script's ctxv1 config), epochs by shots,
    16 shots for --split base and 3 seeds, each with the release file it comes from."""
    common = ["--data", "dtd", "--data-root", str(tmp_path), "--method", "coop,cocoop,clipfit"]
    few = printed(print_config(*common, "--shots", "16", cwd=tmp_path).stdout)[0]
    b2n = printed(print_config(*common, "--split", "base", cwd=tmp_path).stdout)[0]
    release_file = re.compile(r"(CoOp|CLIPFit) release, (configs|scripts)/\S+\.(yaml|sh)")
    for fields in (few, b2n):
        for method, config in fields.items():
            expected = dict(schedule="dassl", crop_scale=0.08, seed=1, seeds=3, epochs=None)
            for name, value in expected.items():
                assert value is None or config[name][0] == value, (method, name)
                assert release_file.search(config[name][1]), (method, name, config[name][1])
    assert few["coop"]["ctx_init"][0] == "16" and release_file.search(few["coop"]["ctx_init"][1]) is None
    assert "scripts/coop/main.sh" in few["coop"]["ctx_init"][1]
    assert [few[m]["epochs"][0] for m in ("coop", "cocoop", "clipfit")] == [200, 10, 100]
    assert "vit_b16.yaml" in few["coop"]["epochs"][1]  # 8 and 16 shots
    assert b2n["coop"]["ctx_init"][0] == "a photo of a" and all(c["shots"][0] == 16 for c in b2n.values())
    assert all("base2new_train.sh" in c["shots"][1] for c in b2n.values())


def test_config_replays_a_run(tree, tmp_path):
    argv = ["--data", "folder", "--data-root", str(tree), "--model", str(tree / "tiny.safetensors")]
    argv += ["--method", "zero-shot", "--workers", "0", "--ood", f"again={tree / 'val'}", "--run-dir", str(tmp_path)]
    train.main(argv)
    config = tmp_path / "zero-shot" / "config.json"
    (replayed,) = train.parse_args(["--config", str(config)])
    assert replayed == train.parse_args(argv)[0]  # the same configuration, run directory included
    (changed,) = train.parse_args(["--config", str(config), "--epochs", "3"])
    assert changed == dataclasses.replace(replayed, epochs=3)  # flags override the file
    fields, _ = printed(print_config("--config", str(config), "--epochs", "3", cwd=tmp_path).stdout)
    assert fields["zero-shot"]["data_root"] == (str(tree), f"config {config}")
    assert fields["zero-shot"]["epochs"] == (3, "flag")


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a run's config.json, one object of fields"),
        ('{"epochz": 3}', "unknown field 'epochz'"),
        ('{"epochs": "3"}', "epochs = \"3\" is not of type <class 'int'>"),
        ('{"flip": 1}', "flip = 1 is not of type <class 'bool'>"),
    ],
)
def test_a_bad_config_file_is_one_line(tmp_path, capsys, content, problem):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--config", str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith(f"error: --config {path}: {problem}") and err.count("\n") == 1
