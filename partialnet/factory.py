"""Any classifier from a factory: `FILE.py:FACTORY`, `package.module:FACTORY`, or a zoo name.

Loading a user's file runs their code: that is the point of FILE.py:FACTORY. Weights are still read safely
(partialnet.checkpoint, weights_only) and loaded strictly. What the export needs to rebuild the same eager model
later is recorded as plain data (`FactoryModel.source`): the file and its sha256, the factory, the weights and
their sha256, the seed and a hash of the resulting state; `rebuild` refuses in one line when any of them changed.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .build import init_weights
from .checkpoint import match_state_dict, read_checkpoint
from .errors import CheckpointError, UsageError, first_line
from .files import file_sha256
from .variants import IMAGENET, Preprocess
from .zoo_table import ZOO

DEFAULT_INPUT_SIZE = 224
_USER_FILES: dict[str, str] = {}  # module name -> path of every user file loaded in this process


@dataclass(frozen=True)
class FactoryRef:
    """Where a factory lives: a file (path) or an importable module, and the callable's name in it."""

    factory: str
    file: Path | None = None
    module: str | None = None

    @property
    def label(self) -> str:
        return f"{self.file.name if self.file else self.module}:{self.factory}"


def parse_target(text: str) -> FactoryRef | None:
    """`FILE.py:FACTORY` or `package.module:FACTORY` (None for anything else: a variant or zoo name)."""
    if text in ZOO:
        module, _, factory = ZOO[text].factory.partition(":")
        return FactoryRef(factory, module=module)
    where, sep, factory = text.rpartition(":")
    if not sep or not where or not factory.isidentifier():
        return None
    if where.endswith(".py"):
        return FactoryRef(factory, file=Path(where).expanduser().resolve())
    if all(part.isidentifier() for part in where.split(".")):
        return FactoryRef(factory, module=where)
    return None


def _import_file(path: Path) -> Any:
    """Run a user's file as a module of its own name-space; its folder is importable while it loads (siblings)."""
    if not path.is_file():
        raise UsageError(f"{path} does not exist; pass FILE.py:FACTORY with the path of your model file.")
    name = f"_deploy_user_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"{path} cannot be imported as Python; pass a .py file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look a module up by name while it runs
    _USER_FILES[name] = str(path)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        del _USER_FILES[name]
        raise UsageError(f"running {path} failed: {first_line(e)}; fix the file (it runs as plain Python).") from e
    finally:
        sys.path.remove(str(path.parent))
    return module


def _restore(files: dict[str, str], payload: bytes) -> Any:
    import pickle

    for path in files.values():
        _import_file(Path(path))  # the same path gives the same module name, so the classes resolve
    return pickle.loads(payload)


class Portable:
    """A model that unpickles in a fresh process (a spawned worker) although its classes live in a user's file:
    those files are imported there first, then the model is unpickled."""

    def __init__(self, model: nn.Module, files: dict[str, str]):
        self.model, self.files = model, files

    def __reduce__(self):
        import pickle

        return _restore, (self.files, pickle.dumps(self.model))


def portable(model: nn.Module) -> Any:
    """What to send to another process instead of `model` (it arrives as the model itself). The user files loaded
    in this process go along (a model's classes may come from a file its factory's file imports), except those
    since deleted: another model's file, loaded earlier in a long-lived process, may be gone."""
    files = {name: path for name, path in _USER_FILES.items() if Path(path).is_file()}
    return Portable(model, files) if files else model


def load_factory(ref: FactoryRef) -> Callable[..., Any]:
    """The factory callable, or a one-line error naming what the file or module defines instead."""
    if ref.file is not None:
        module = _import_file(ref.file)
        where = str(ref.file)
    else:
        try:
            module = importlib.import_module(ref.module)  # type: ignore[arg-type]
        except Exception as e:
            raise UsageError(f"cannot import {ref.module}: {first_line(e)}; is it installed or on PYTHONPATH?") from e
        where = ref.module
    fn = getattr(module, ref.factory, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise UsageError(f"{where} has no callable {ref.factory!r}; it defines: {', '.join(found) or 'nothing callable'}.")
    return fn


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def state_sha256(model: nn.Module) -> str:
    """A hash of every tensor of the state dict, in order: the same model built twice has the same hash."""
    h = hashlib.sha256()
    for key, t in model.state_dict().items():
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class FactoryModel:
    """A factory's model with the facts an export records; the same attributes the pipeline reads of a variant."""

    model: nn.Module
    name: str
    preprocess: Preprocess
    num_classes: int
    source: dict[str, Any]
    checkpoint_sha256: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def architecture(self) -> dict[str, Any]:
        return {"kind": "factory", "class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
                "num_classes": self.num_classes}

    def require_memory(self, input_size: int, batch: int, what: str) -> None:
        """No architecture table to estimate from: the first forward pass is the check."""


def _call_factory(ref: FactoryRef, num_classes: int | None, seed: int) -> nn.Module:
    fn = load_factory(ref)
    kwargs = {}
    if num_classes is not None:
        if not _accepts(fn, "num_classes"):
            raise UsageError(f"{ref.label} takes no num_classes argument; drop --num-classes (the model decides).")
        kwargs["num_classes"] = num_classes
    torch.manual_seed(seed)  # whatever the factory draws at random is the same on every rebuild
    try:
        model = fn(**kwargs)
    except Exception as e:
        raise UsageError(f"{ref.label}({', '.join(f'{k}={v}' for k, v in kwargs.items())}) failed: "
                         f"{first_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise UsageError(f"{ref.label} returned a {type(model).__name__}, not a torch.nn.Module classifier.")
    return model


def _load_weights(model: nn.Module, weights: str | Path, allow_pickle: bool, what: str) -> tuple[str, str]:
    ck = read_checkpoint(weights, allow_pickle=allow_pickle)
    full = match_state_dict(model, ck.state_dict, what=f"weights {ck.path}",
                            hint=f"Pass the weights saved from {what}'s state_dict().")
    model.load_state_dict(full, strict=True)
    return ck.sha256, ck.format


def _output_classes(model: nn.Module, ref: FactoryRef, input_size: int) -> int:
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, input_size, input_size))
    except Exception as e:
        raise UsageError(f"{ref.label}'s model fails on a [1, 3, {input_size}, {input_size}] input: "
                         f"{first_line(e)}; pass the --input-size it was built for.") from e
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        seen = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"{ref.label}'s model returns {seen}; a classifier returns logits [batch, classes].")
    return int(out.shape[1])


def build_from_factory(target: str, weights: str | Path | None = None, *, num_classes: int | None = None,
                       input_size: int | None = None, preprocess: Preprocess | None = None,
                       allow_pickle: bool = False, seed: int = 0) -> FactoryModel:
    """Call the factory (with num_classes when given), load weights strictly or initialise fresh, in eval mode."""
    ref = parse_target(target)
    if ref is None:
        raise UsageError(f"{target!r} is not FILE.py:FACTORY, package.module:FACTORY or a zoo model "
                         f"({', '.join(ZOO)}).")
    model = _call_factory(ref, num_classes, seed)
    notes: list[str] = []
    weights_sha = weights_format = None
    if weights is not None:
        weights_sha, weights_format = _load_weights(model, weights, allow_pickle, ref.label)
    else:
        init_weights(model, seed)  # fan-in scaled, as for a variant without a checkpoint
        notes.append(f"freshly initialised (seed {seed}), no weights")
    model.eval()
    size = input_size or DEFAULT_INPUT_SIZE
    classes = _output_classes(model, ref, size)
    source = {
        "kind": "factory",
        "target": target,
        "file": str(ref.file) if ref.file else None,
        "module": ref.module,
        "factory": ref.factory,
        "file_sha256": file_sha256(_source_file(ref)),
        "num_classes_arg": num_classes,
        "weights": str(Path(weights).resolve()) if weights is not None else None,
        "weights_sha256": weights_sha,
        "format": weights_format,
        "seed": None if weights is not None else seed,
        "state_sha256": state_sha256(model),
        "notes": notes,
    }
    name = target if target in ZOO else ref.factory if ref.file is None else f"{ref.file.stem}.{ref.factory}"
    return FactoryModel(model, name, (preprocess or IMAGENET).at(size), classes, source, weights_sha, notes)


def _source_file(ref: FactoryRef) -> Path:
    if ref.file is not None:
        return ref.file
    spec = importlib.util.find_spec(ref.module)  # type: ignore[arg-type]
    if spec is None or spec.origin is None:
        raise UsageError(f"cannot find the file of module {ref.module}.")
    return Path(spec.origin)


def _require_unchanged(path: Path, recorded: str, what: str, if_gone: str, if_changed: str) -> None:
    if not path.is_file():
        raise CheckpointError(f"the export's {what} {path} is gone; the eager reference needs it "
                              f"(sha256 {recorded[:12]}...). {if_gone}".rstrip())
    now = file_sha256(path)
    if now != recorded:
        raise CheckpointError(f"{path} changed since the export (sha256 {now[:12]}..., export recorded "
                              f"{recorded[:12]}...); {if_changed}")


def rebuild(source: dict[str, Any], *, allow_pickle: bool = False) -> nn.Module:
    """The eager model an export recorded, or a one-line refusal when its file, weights or state changed."""
    ref = FactoryRef(source["factory"], Path(source["file"]) if source.get("file") else None, source.get("module"))
    _require_unchanged(_source_file(ref), source["file_sha256"], "model file", "Restore it or re-export.",
                       "restore it or re-export with --force.")
    weights = source.get("weights")
    if weights:
        _require_unchanged(Path(weights), source["weights_sha256"], "weights", "", "re-export with --force.")
    model = _call_factory(ref, source.get("num_classes_arg"), int(source.get("seed") or 0))
    if weights:
        _load_weights(model, weights, allow_pickle, ref.label)
    else:
        init_weights(model, int(source.get("seed") or 0))
    model.eval()
    if state_sha256(model) != source["state_sha256"]:
        raise CheckpointError(f"{ref.label} builds a different model than at export (state hash differs though the "
                              f"file is unchanged: does it depend on something else, or draw unseeded random "
                              f"numbers?); re-export with --force.")
    return model
