"""The command line of every entry point: train.py, train_seg.py, transfer.py, evaluate.py and bench.py.

A config dataclass (train.TrainConfig, train_seg.SegConfig) is its own command line: one flag per
field, its --help the field's metadata. `parse` resolves one config per method of a command by one
rule (`resolve`):

    the dataclass's defaults < the command's recipe (recipes.py for train.py) < --config FILE < the flags

checks each (RANGES and CHOICES, then the command's own checks), and with --print-config prints them,
one table per method with each value's source, and exits without reading data or weights. Bad input
ends with one line naming the flag: exit code 2 for a flag (ArgumentParser.error), 1 for a --config
file that is not a run's config.json. `launch` starts the process (DDP under torchrun, the device,
--threads) and ends a preemption, Ctrl-C, a non-finite loss or bad input with one line and its exit code.
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import signal
import sys
import typing
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

import faults
from data import DataError, coop, names, retrieval, toy
from data import templates as prompt_sets
from weight_files import WeightsError


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the flag, not the usage of forty flags
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def refuse(message):
    """End the command as a bad flag ends it: one line, exit code 2."""
    ArgumentParser().error(message)


def at_least(parser, *checks):
    """parser.error for the first (flag, value, least) with value < least; a value of None was not given."""
    for flag, value, least in checks:
        if value is not None and value < least:
            parser.error(f"{flag} {value}: expected >= {least}")


def rank(text):
    """--rank: an integer r, or full (d x d adapters)."""
    return None if text == "full" else int(text)


# ------------------------------------------------------------------ checks
RANGES = {  # field: (check, what it must be); a config is checked on the fields it has
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "eval_batch": (lambda v: v >= 1, ">= 1"),
    "epochs": (lambda v: v >= 1, ">= 1"),
    "accum_steps": (lambda v: v >= 1, ">= 1"),
    "lr": (lambda v: v > 0, "> 0"),
    "warmup": (lambda v: v >= 0, ">= 0"),
    "p": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "m": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "shots": (lambda v: v is None or v >= 1, ">= 1"),
    "tau": (lambda v: v is None or v > 0, "> 0"),
    "epsilon": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "delta": (lambda v: v >= 0, ">= 0"),
    "alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "save_every": (lambda v: v >= 1, ">= 1"),
    "log_every": (lambda v: v >= 1, ">= 1"),
    "rank": (lambda v: v is None or v >= 1, ">= 1 or full"),
    "workers": (lambda v: v >= 0, ">= 0"),
    "min_lr": (lambda v: v >= 0, ">= 0"),
    "max_steps": (lambda v: v is None or v >= 1, ">= 1"),
    "seeds": (lambda v: v >= 1, ">= 1"),
    "iterations": (lambda v: v >= 1, ">= 1"),
    "crop": (lambda v: v >= 1, ">= 1"),
    "eval_size": (lambda v: v is None or v >= 1, ">= 1"),
    "clip_lr_scale": (lambda v: v >= 0, ">= 0"),
    "grad_clip": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "crop_scale": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "threads": (lambda v: v is None or v >= 1, ">= 1"),
}
CHOICES = {
    "loss": ("mpm-nce", "infonce", "ce"),
    "drop_mode": ("sample", "token"),
    "optimizer": ("adamw", "sgd"),
    "schedule": ("cosine", "dassl"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "split": (None, "base"),
    "report_to": (None, "tensorboard"),
}


def check_fields(cfg):
    """The first field of cfg out of its RANGES or CHOICES, as one line naming the flag, or None."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    for name, (ok, want) in RANGES.items():
        if name in fields and not ok(getattr(cfg, name)):
            return f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected {want}"
    for name, choices in CHOICES.items():
        if name in fields and getattr(cfg, name) not in choices:
            return f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected one of {', '.join(map(str, choices))}"
    if cfg.overwrite and cfg.resume:
        return f"--overwrite starts over, --resume {cfg.resume} continues: give one of them"
    return None


def check_train(cfg):
    """What is wrong with a resolved train.TrainConfig, as one line naming the flag, or None."""
    if cfg.data not in names():
        return f"--data {cfg.data}: expected one of {', '.join(names())}"
    problem = check_fields(cfg)
    if problem:
        return problem
    if cfg.min_lr > cfg.lr:
        return f"--min-lr {cfg.min_lr}: expected <= --lr {cfg.lr}"
    if cfg.schedule == "dassl" and cfg.warmup_epochs and cfg.warmup_lr is None:
        return "--schedule dassl: its warm-up is constant: give --warmup-lr (or --warmup-epochs 0)"
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's number of processes
    if cfg.batch_size % (world * cfg.accum_steps):
        return f"--batch-size {cfg.batch_size}: expected a multiple of --accum-steps {cfg.accum_steps} x {world} GPUs"
    if cfg.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        return "--report-to tensorboard: the tensorboard package is not installed (pip install tensorboard)"
    if cfg.data not in toy.NAMES and cfg.data_root is None:
        return f"--data {cfg.data} needs --data-root DIR"
    retrieval_task = cfg.data in retrieval.DATASETS
    if cfg.split and retrieval_task:
        return f"--split base: --data {cfg.data} has captions, not classes (use a CoOp dataset, imagenet or toy)"
    if cfg.ood and (cfg.split or cfg.data in coop.DATASETS):
        return "--ood: base-to-novel and the CoOp datasets evaluate their own test set only"
    if cfg.split and cfg.method in ("linear-probe", "full-ft", "wise-ft"):
        return (
            f"--split base: --method {cfg.method} learns head rows for the base classes only: it cannot score new ones"
        )
    ce_only = ("clipfit", "coop", "cocoop", "linear-probe", "prolip")
    ce_only += () if retrieval_task else ("full-ft", "wise-ft")
    if cfg.method in ce_only and cfg.loss != "ce":
        return f"--method {cfg.method} trains with cross-entropy over class logits: drop --loss {cfg.loss}"
    if retrieval_task and cfg.loss == "ce":
        return f"--data {cfg.data} is retrieval (captions, no classes): --method {cfg.method} needs another --loss"
    if cfg.method == "lora" and cfg.rank is None:
        return "--method lora needs --rank r >= 1"
    if not cfg.ctx_init.strip() or (cfg.ctx_init.isdigit() and int(cfg.ctx_init) < 1):
        return f"--ctx-init {cfg.ctx_init!r}: expected words or a number M >= 1 of context vectors"
    for name in ("prompts", "eval_prompts"):
        value = getattr(cfg, name)
        if not prompt_sets.valid(value):
            return f"--{name.replace('_', '-')} {value!r}: expected task, imagenet-80 or a template with {{}}"
    return None


# Which prompt sets a method reads: CoOp's and CoCoOp's learned context replaces both; CLIPFit's loss reads the
# first training template only; the head of full-ft, WiSE-FT, the linear probe and ProLIP starts from the
# evaluation templates' zero-shot classifier, and their losses read no training template.
READS_NO_TRAINING_TEMPLATES = ("coop", "cocoop", "zero-shot", "full-ft", "wise-ft", "linear-probe", "prolip")
READS_NO_EVALUATION_TEMPLATES = ("coop", "cocoop")


def train_header(cfg):
    """--print-config's first line for a train.TrainConfig: how many templates of its prompt sets it reads."""
    own = prompt_sets.own(cfg.data)
    train, evaluation = (len(prompt_sets.templates(getattr(cfg, name), own)) for name in ("prompts", "eval_prompts"))
    train = 0 if cfg.method in READS_NO_TRAINING_TEMPLATES else min(train, 1) if cfg.method == "clipfit" else train
    evaluation = 0 if cfg.method in READS_NO_EVALUATION_TEMPLATES else evaluation
    return f"# {cfg.method}: {train} training templates, {evaluation} evaluation templates"


# ---------------------------------------------------------- --config FILE
class ConfigError(ValueError):
    """A --config file that is not a run's config.json; the message names it."""


def read_config(path, types):
    """--config FILE: a run's config.json as {field: value}, each value checked against types[field]."""
    try:
        values = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"--config {path}: not JSON ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a run's config.json, one object of fields")
    for name, value in values.items():
        if name not in types:
            raise ConfigError(f"--config {path}: unknown field {name!r}")
        kinds = typing.get_args(types[name]) or (types[name],)  # Optional[int] -> (int, NoneType)
        kinds += (int,) if float in kinds else (list,) if tuple in kinds else ()  # JSON's 1 and [..]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ConfigError(f"--config {path}: {name} = {json.dumps(value)} is not of type {types[name]}")
    return values


# ------------------------------------------------------------- resolution
def resolve(chosen, defaults, recipe, default_sources=None):
    """[(values, sources)], one per method of a command: `defaults` < recipe(command, method) (a flat
    {field: (value, source)}) < each of `chosen` ([(source, {field: value})]: --config FILE, then the
    flags). The methods: --method if given, else the recipe's method list (recipe(command, None)), else
    the default."""
    default_sources = default_sources or {}
    given = {k: v for _, values in chosen for k, v in values.items()}
    command = {**defaults, **given}
    listed, method_source = defaults["method"], default_sources.get("method", "default")
    if "method" in recipe(command, None):
        listed, method_source = recipe(command, None)["method"]
    for source, values in chosen:
        if "method" in values:
            listed, method_source = values["method"], source
    out = []
    for method in listed.split(","):
        values = dict(defaults)
        sources = {k: default_sources.get(k, "default") for k in defaults}
        for k, (value, source) in recipe(command, method).items():
            values[k], sources[k] = value, source
        for source, layer in chosen:
            values |= layer
            sources |= dict.fromkeys(layer, source)
        values["method"], sources["method"] = method, method_source
        values = {k: tuple(v) if isinstance(defaults[k], tuple) else v for k, v in values.items()}
        out.append((values, sources))
    return out


def describe(cfg, sources, header):
    """--print-config: the header line, then each field's value (JSON) and where it came from."""
    values = {name: json.dumps(value) for name, value in dataclasses.asdict(cfg).items()}
    width, value_width = max(map(len, values)), max(map(len, values.values()))
    lines = [header]
    for name, value in values.items():
        lines.append(f"{name:<{width}}  {value:<{value_width}}  {sources.get(name, 'default')}")
    return "\n".join(lines)


def add_flags(parser, config_class):
    """One flag per field of config_class, its help the field's metadata; a flag not given is absent."""
    for f in dataclasses.fields(config_class):
        flag, kw = "--" + f.name.replace("_", "-"), dict(default=argparse.SUPPRESS, help=f.metadata["help"])
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.type is tuple:
            parser.add_argument(flag, action="append", metavar="NAME=DIR", **kw)
        else:
            kind = {Optional[int]: int, Optional[float]: float, Optional[str]: str}.get(f.type, f.type)
            parser.add_argument(flag, type=rank if f.name == "rank" else kind, **kw)


def parse(
    config_class,
    argv=None,
    *,
    description,
    methods,
    recipe,
    check,
    header=lambda cfg: f"# {cfg.method}",
    default_sources=None,
    warn=None,
    switches=None,
):
    """The command line argv as one checked config_class per method, and {switch: bool}.

    recipe(command, method): the method's flat recipe {field: (value, source)} in the command ({field:
    value}); with method None, {'method': (list, source)} when the command's setting names its methods.
    check(cfg): the command's own problem with cfg as one line, or None. header(cfg): --print-config's
    first line. default_sources: {field: source} of the dataclass's defaults. warn(cfg): raises a
    ValueError that --print-config prints as a warning (e.g. a missing data root). switches: {flag:
    help} of extra on/off flags."""
    doc = argparse.RawDescriptionHelpFormatter
    parser = ArgumentParser(description=description, formatter_class=doc, allow_abbrev=False)
    add_flags(parser, config_class)
    parser.add_argument("--config", metavar="FILE", help="replay a run's config.json; the flags given override it")
    parser.add_argument("--print-config", action="store_true", help="print each method's config, each value's source")
    for flag, text in (switches or {}).items():
        parser.add_argument(flag, action="store_true", help=text)
    flags = vars(parser.parse_args(argv))
    on = {flag: flags.pop(flag.removeprefix("--").replace("-", "_")) for flag in switches or {}}
    config, print_config = flags.pop("config", None), flags.pop("print_config")
    fields = dataclasses.fields(config_class)
    try:
        chosen = [(f"config {config}", read_config(config, {f.name: f.type for f in fields}))] if config else []
    except ConfigError as e:
        parser.exit(1, f"error: {e}\n")
    defaults = {f.name: f.default for f in fields}
    resolved = resolve([*chosen, ("flag", flags)], defaults, recipe, default_sources)
    cfgs = [config_class(**values) for values, _ in resolved]
    for cfg in cfgs:
        problem = f"--method {cfg.method}: expected one of {', '.join(methods)}" if cfg.method not in methods else None
        problem = problem or check(cfg)
        if problem:
            parser.error(problem)
    if print_config:
        print("\n\n".join(describe(cfg, sources, header(cfg)) for cfg, (_, sources) in zip(cfgs, resolved)))
        try:
            if warn:
                warn(cfgs[0])
        except ValueError as e:  # the config is still worth seeing
            print(f"warning: {e}", file=sys.stderr)
        parser.exit(0)
    return cfgs, on


# ------------------------------------------------------------- the process
def one_line(e):
    """The message of e; for an error re-raised from a DataLoader worker, the original error's line."""
    line = str(e).strip().splitlines()[-1]
    return line.removeprefix(f"{type(e).__module__}.{type(e).__name__}: ").removeprefix(f"{type(e).__name__}: ")


def launch(run_fn, cfgs):
    """Start the process (DDP under torchrun, the device, --threads), call run_fn(cfgs, device, ddp_rank,
    world_size), and end a preemption, Ctrl-C, a non-finite loss or bad input with one line and its exit code."""
    ddp_rank, world_size = 0, 1
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # README, "Several GPUs": why 30 minutes is safe
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(minutes=30))
        ddp_rank, world_size = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    threads = torch.get_num_threads()
    if cfgs[0].threads:  # the intra-op threads fix the order CPU kernels sum in (docs/install.md)
        torch.set_num_threads(cfgs[0].threads)
    try:
        run_fn(cfgs, device, ddp_rank, world_size)
    except faults.Preempted as e:  # every rank, after the checkpoint
        if ddp_rank == 0:
            print(e)
        sys.exit(e.code)
    except KeyboardInterrupt:  # a second Ctrl-C in training, or one outside it: no traceback
        if ddp_rank == 0:
            print("stopped at once; continue from the last checkpoint with --resume latest")
        sys.exit(128 + signal.SIGINT)
    except faults.NonFiniteLoss as e:  # every rank, at the same step
        sys.exit(f"error: {e}" if ddp_rank == 0 else 1)
    except (DataError, WeightsError, OSError) as e:  # the user's input, named in the message: no traceback
        sys.exit(f"error: {one_line(e)}")
    finally:
        torch.set_num_threads(threads)  # as it was, for a caller in the same process
        if world_size > 1:
            dist.destroy_process_group()
