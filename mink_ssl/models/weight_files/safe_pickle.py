"""Read any torch weights file without running code from its pickle.

A ``.pth`` file is a pickle, and a pickle names the functions that rebuild it: a file from the
internet can name ``os.system``. ``torch.load(weights_only=True)`` refuses every object it does
not know, which refuses the released checkpoints too (PointContrast stores its OmegaConf config
next to the weights). This reader sits between the two: it uses torch's own file handling (zip
and legacy formats, storages) with an unpickler whose ``find_class`` returns

- the real object only for an allow-list of data constructors: tensors and storages, torch
  dtypes and sizes, ``OrderedDict`` and other plain containers, numpy arrays, dtypes and scalars;
- for every other name, an inert stand-in (:class:`Foreign`): calling it, building it or setting
  its state only records the arguments. Nothing named by the file is imported or run.

:func:`plain_data` then turns the stand-ins into inert data where their meaning is known
(OmegaConf configs to dicts and lists, ``argparse.Namespace`` to a dict, paths to strings) and
leaves the others as :class:`Foreign` records that the caller reports. A file that names a
function of a module that runs code (``os``, ``subprocess``, ``builtins.eval``, ...) is refused:
it was crafted, and its weights are not to be trusted either.
"""
from __future__ import annotations

import _compat_pickle
import collections
import os
import pickle
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: module roots whose names in a pickle mean "run code": such a file is refused
CODE_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy",
    "pickle", "_pickle", "marshal", "ctypes", "code", "codeop", "pty", "webbrowser",
    "multiprocessing", "signal", "asyncio", "threading", "_thread", "tempfile", "io", "_io",
    "fileinput", "types", "inspect", "gc", "functools",
    "operator", "commands", "popen2", "timeit", "pdb", "bdb", "trace", "cProfile", "profile",
    "torch.storage", "torch.serialization", "torch.jit", "torch.hub", "torch.ops", "torch._C",
    "numpy.testing", "numpy.f2py", "numpy.distutils",
})
#: names of ``builtins`` that are data constructors; every other builtin (eval, exec, open,
#: getattr, __import__, compile, ...) refuses the file
SAFE_BUILTINS = {name: getattr(__import__("builtins"), name) for name in (
    "set", "frozenset", "slice", "complex", "bytearray", "bytes", "int", "float", "str", "bool",
    "tuple", "list", "dict", "range", "object")}


class UnsafeFileError(ValueError):
    """A weights file names code to run when unpickled (it was refused; nothing ran)."""


class Foreign:
    """An object of a class (or the result of a call) that the reader did not run.

    ``name``: the dotted name the pickle gave; ``args``/``kwargs``: the arguments of the call or
    constructor; ``state``: what ``BUILD`` would have set; ``items``/``values``: what the
    pickle's ``SETITEM(S)`` / ``APPEND(S)`` added.
    """

    name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items, obj.values = args, kwargs, None, {}, []
        return obj

    def __init__(self, *args, **kwargs):  # the arguments are kept by __new__
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.values.append(value)

    def extend(self, values):
        self.values.extend(values)

    def __call__(self, *args, **kwargs):  # a call on a foreign result stays foreign
        return _stand_in(f"{self.name}(...)")(*args, **kwargs)

    def __reduce__(self):
        raise TypeError(f"a stand-in for {self.name} cannot be pickled")

    def __repr__(self):
        return f"<not run: {self.name}>"


_STAND_INS: dict[str, type] = {}


def _stand_in(name: str) -> type:
    """The (cached) inert class standing for the global ``name``."""
    if name not in _STAND_INS:
        _STAND_INS[name] = type(name.rsplit(".", 1)[-1], (Foreign,), {"name": name})
    return _STAND_INS[name]


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None,
                    metadata=None):
    """A plain tensor from a storage (torch's rebuild, without hooks or metadata)."""
    return torch._utils._rebuild_tensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    """A parameter is kept as its plain tensor."""
    return _check_tensor(data, "a parameter")


def _rebuild_from_type(func, new_type, args, state):
    """A tensor saved with its (sub)class: only torch's own tensor types are accepted."""
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        raise UnsafeFileError(f"a tensor of class {getattr(new_type, 'name', new_type)} "
                              "(a subclass named by the file) cannot be rebuilt safely")
    return _check_tensor(func(*args), "a typed tensor")


def _check_tensor(obj, what: str):
    if not isinstance(obj, torch.Tensor):
        raise UnsafeFileError(f"{what} was rebuilt from {obj!r}, not from tensor data")
    return obj


def _numpy_scalar(dtype, data=None):
    return np.frombuffer(data, dtype=dtype, count=1)[0] if data is not None else dtype.type()


_TORCH_ALLOWED = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch._tensor", "_rebuild_from_type"): _rebuild_from_type,
    ("torch", "Size"): torch.Size,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "device"): torch.device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("collections", "deque"): collections.deque,
}


@dataclass
class ReadReport:
    """What the reader met: ``foreign``: dotted names of the classes and functions it did not
    run, with how often each occurred (they are stand-ins in the result)."""

    foreign: collections.Counter = field(default_factory=collections.Counter)


class SafeUnpickler(pickle.Unpickler):
    """``find_class`` returns data constructors only; any other name becomes a stand-in."""

    report: ReadReport  # set per read by _module()

    def find_class(self, module: str, name: str):
        # Python 2 names (protocol 2 files), mapped as pickle's fix_imports does
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        allowed = _allowed(module, name)
        if allowed is not None:
            return allowed
        dotted = f"{module}.{name}"
        # a stand-in never runs; a name from a module that runs code marks a crafted file
        if (any(module == m or module.startswith(m + ".") for m in CODE_MODULES) or
                (module == "builtins" and name not in SAFE_BUILTINS)):
            raise UnsafeFileError(
                f"the file names {dotted}, which runs code when unpickled; it was refused and "
                "nothing was run. Files from the internet are data: get the weights from their "
                "authors' release, or export them as a plain state dict of tensors")
        self.report.foreign[dotted] += 1
        return _stand_in(dotted)


def _allowed(module: str, name: str):
    if (module, name) in _TORCH_ALLOWED:
        return _TORCH_ALLOWED[(module, name)]
    if module == "torch":
        obj = getattr(torch, name, None)
        if isinstance(obj, torch.dtype):
            return obj
    if module == "torch.serialization" and name == "_get_layout":
        return torch.serialization._get_layout
    if module == "builtins" and name in SAFE_BUILTINS:
        return SAFE_BUILTINS[name]
    if module == "_codecs" and name == "encode":
        return _encode_bytes
    if module == "copyreg" and name == "_reconstructor":
        return _reconstructor
    if module == "numpy" and name in ("ndarray", "dtype"):
        return getattr(np, name)
    if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        if name == "_reconstruct":
            return _reconstruct_ndarray
        if name == "scalar":
            return _numpy_scalar
    if module == "numpy.dtypes" and name.endswith("DType"):
        return getattr(np.dtypes, name, None)
    return None


def _encode_bytes(text, encoding="utf-8"):
    """``_codecs.encode``, how protocol 2 pickles store bytes (``latin1`` text)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafeFileError(f"the file encodes {type(text).__name__} with {encoding!r}, which "
                              "is not how a pickle stores bytes")
    return text.encode(encoding)


def _reconstructor(cls, base, state):
    """``copyreg._reconstructor`` (protocol 0/1 objects) for stand-ins only."""
    if isinstance(cls, type) and issubclass(cls, Foreign):
        return cls(*(() if state is None else (state,)))
    raise UnsafeFileError(f"the file rebuilds {cls!r} through copyreg, which is not a data class")


def _reconstruct_ndarray(subtype, shape, dtype):
    """An empty ndarray that ``BUILD`` fills (numpy's own pickle protocol), plain class only."""
    if subtype is not np.ndarray:
        raise UnsafeFileError(f"an array of class {getattr(subtype, 'name', subtype)} cannot be "
                              "rebuilt safely")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _module(report: ReadReport) -> types.ModuleType:
    """A pickle-module object for ``torch.load``: its Unpickler and load use the allow-list."""
    unpickler = type("SafeUnpickler", (SafeUnpickler,), {"report": report})

    def load(file, **kwargs):
        return unpickler(file, **kwargs).load()

    module = types.ModuleType("mink_ssl_safe_pickle")
    module.Unpickler, module.load, module.__version__ = unpickler, load, "1"
    return module


def safe_torch_load(path: str | os.PathLike) -> tuple[Any, ReadReport]:
    """``(object, report)`` of a torch file, tensors on the CPU, without running its code.

    Raises :class:`UnsafeFileError` for a file that names code to run (nothing ran), and
    ``ValueError`` naming the file for a file that is not a torch file or is damaged.
    """
    path = Path(path)
    if _is_torchscript(path):
        raise ValueError(f"{path} is a TorchScript archive (a compiled program, not weights); "
                         "export the model's state_dict with torch.save instead")
    report = ReadReport()
    if os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        raise ValueError("TORCH_FORCE_WEIGHTS_ONLY_LOAD is set, which refuses mink-ssl's safe "
                         f"reader for {path}; unset it (this reader never runs code from a file)")
    try:
        obj = torch.load(path, map_location="cpu", pickle_module=_module(report),
                         weights_only=False)
    except UnsafeFileError:
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, KeyError,
            AttributeError, TypeError, ValueError, OSError) as e:
        raise ValueError(f"{path} cannot be read as a torch weights file "
                         f"({type(e).__name__}: {e}); is it complete (compare its size with the "
                         "download's) and a .pth saved by torch.save?") from e
    return obj, report


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


# --------------------------------------------------------------------------- plain data

def plain_data(obj: Any, foreign: list[str] | None = None, path: str = "") -> Any:
    """``obj`` with every stand-in turned into inert data where its meaning is known.

    OmegaConf ``DictConfig`` / ``ListConfig`` (any version) become dicts and lists of their
    values, ``argparse.Namespace`` a dict, ``pathlib`` paths strings, numpy scalars Python
    numbers; other stand-ins stay :class:`Foreign` and their location is appended to
    ``foreign``. Tensors and arrays are returned as they are.
    """
    foreign = [] if foreign is None else foreign
    if isinstance(obj, (torch.Tensor, np.ndarray, str, bytes, int, float, bool, type(None))):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return type(obj)((k, plain_data(v, foreign, f"{path}.{k}" if path else str(k)))
                         for k, v in obj.items()) if isinstance(obj, collections.OrderedDict) \
            else {k: plain_data(v, foreign, f"{path}.{k}" if path else str(k))
                  for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [plain_data(v, foreign, f"{path}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, (set, frozenset)):
        return sorted((plain_data(v, foreign, path) for v in obj), key=repr)
    if isinstance(obj, Foreign):
        return _foreign_data(obj, foreign, path)
    return obj


def _foreign_data(obj: Foreign, foreign: list[str], path: str) -> Any:
    name = obj.name
    state = obj.state if isinstance(obj.state, dict) else (
        obj.state[1] if isinstance(obj.state, tuple) and len(obj.state) == 2
        and isinstance(obj.state[1], dict) else None)
    if name.startswith("omegaconf."):
        if state is not None and "_content" in state:
            return plain_data(state["_content"], foreign, path)
        if state is not None and "_val" in state:
            return plain_data(state["_val"], foreign, path)
        if state is not None and "__dict__" in state:  # omegaconf 2.1+ nests under __dict__
            return _foreign_data(_with_state(obj, state["__dict__"]), foreign, path)
    if name == "argparse.Namespace":
        return plain_data(dict(obj.kwargs or {}, **(state or {})), foreign, path)
    if name.startswith("pathlib.") and all(isinstance(a, str) for a in obj.args):
        return os.path.join(*obj.args) if obj.args else "."
    if name.startswith("typing."):
        return name
    foreign.append(f"{path or '<top>'}: {name}")
    return obj


def _with_state(obj: Foreign, state: dict) -> Foreign:
    copy = _stand_in(obj.name)()
    copy.state = state
    return copy


__all__ = ["Foreign", "ReadReport", "UnsafeFileError", "plain_data", "safe_torch_load",
           "SafeUnpickler", "CODE_MODULES"]
