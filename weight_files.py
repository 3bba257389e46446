"""Reading weight files without running their code.

A checkpoint is a pickle, and unpickling can run any code the file names. These readers rebuild tensors
and plain containers only: state dicts through torch.load(weights_only=True) or safetensors; OpenAI's
TorchScript archives (`ViT-B-16.pt`) through an unpickler that rebuilds tensors and keeps every script
object inert; and files that pickle other objects beside their tensors (a Dassl checkpoint pickles its
scheduler) through torch.load with an unpickler that turns every other class into an inert stand-in.
"""

import io
import pickle
import re
import zipfile
from pathlib import Path

import torch


class WeightsError(ValueError):
    """A weights, adapter or checkpoint file that is not what was expected; the message names it."""


def cause(e):
    """'Type: first clause' of an exception, for a one-line message: torch explains a damaged file over
    many lines, and its advice to load with weights_only=False would run the file's code."""
    first = re.split(r"\.\s|\n", str(e).strip(), maxsplit=1)[0].rstrip(".")
    return f"{type(e).__name__}: {first}" if first and "weights_only" not in first else type(e).__name__


class _ScriptObject:
    """Stand-in for a TorchScript module object: keeps its attributes, runs nothing."""

    def __setstate__(self, state):
        self.state = state


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Reads data.pkl of a TorchScript archive, rebuilding tensors and nothing else."""

    _DTYPES = {
        f"{n}Storage": getattr(torch, d)
        for n, d in [
            ("Float", "float32"),
            ("Half", "float16"),
            ("BFloat16", "bfloat16"),
            ("Double", "float64"),
            ("Long", "int64"),
            ("Int", "int32"),
            ("Short", "int16"),
            ("Char", "int8"),
            ("Byte", "uint8"),
            ("Bool", "bool"),
        ]
    }

    def __init__(self, file, archive, prefix):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if module.startswith("__torch__"):
            return _ScriptObject
        if module == "torch" and name in self._DTYPES:
            return self._DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch.jit._pickle" and name.startswith("build_"):  # int/float/bool/tensor lists
            return list
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return _untagged
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a TorchScript archive")

    def persistent_load(self, pid):  # ('storage', dtype, key, location, numel)
        _, dtype, key, _, numel = pid
        data = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
        storage = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage(0)
        return storage, dtype


def _untagged(value, type_tag):
    return value


def _rebuild_tensor(storage, offset, size, stride, *unused):
    untyped, dtype = storage
    return torch.empty(0, dtype=dtype).set_(untyped, offset, size, stride)


def _read_torchscript(archive: zipfile.ZipFile):
    pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1)
    root = _TensorsOnlyUnpickler(io.BytesIO(archive.read(pkl)), archive, pkl[: -len("data.pkl")]).load()
    tensors = {}

    def walk(obj, prefix):
        for name, value in obj.state.items():
            if isinstance(value, torch.Tensor):
                tensors[prefix + name] = value
            elif isinstance(value, _ScriptObject):
                walk(value, f"{prefix}{name}.")

    walk(root, "")
    return tensors


class _Inert:
    """Stands in for any object of a pickle other than tensors and plain containers: keeps nothing, runs nothing."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _InertUnpickler(pickle.Unpickler):
    """torch.load's unpickler for read_inert: tensors are rebuilt (torch.load supplies their storages), every
    other class or function the pickle names is _Inert."""

    _REBUILD = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter")}

    def find_class(self, module, name):
        if (module, name) in self._REBUILD:
            return getattr(torch._utils, name)
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _Inert


def read_inert(path):
    """A torch.save'd file whose pickle holds objects besides tensors (a Dassl checkpoint pickles its
    scheduler, so torch.load(weights_only=True) refuses it): its tensors and containers, every other object
    an inert stand-in; no code of the file runs."""
    load = lambda f, **kw: _InertUnpickler(f, **kw).load()
    inert = type("inert", (), {"__name__": "inert", "Unpickler": _InertUnpickler, "load": staticmethod(load)})
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=inert)


def read_state_dict(path):
    """Tensors of a checkpoint file (no code runs), with OpenAI/open_clip key names.

    Returns (state_dict, metadata); metadata holds 'quick_gelu' when the file says it."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist()):
                    return _read_torchscript(archive), {"quick_gelu": "true", "format": "torchscript"}
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(
            f"{path}: cannot read it as a CLIP checkpoint (truncated, or not a PyTorch/safetensors file?): {cause(e)}"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}, {}
