"""Reading official PartialNet checkpoints and building the exact architecture they hold.

Containers (spec §3.3): Lightning `.ckpt` (`state_dict` with the `model.` prefix, `hyper_parameters`),
plain state-dict `.pth`, `{'model': ...}` / `{'state_dict': ...}`, a DDP `module.` prefix, and safetensors.
Nothing here runs pickled code unless the caller passes `allow_pickle=True`.
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import CheckpointError
from .files import file_sha256
from .config import ArchConfig

PREFIXES = ("module.", "_orig_mod.")
LIGHTNING_PREFIX = "model."
STAGE_MODULES = (0, 2, 4, 6)


class _HParams:
    """Inert stand-in for argparse.Namespace inside a checkpoint: holds attributes, runs nothing."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


# Containers Lightning and argparse leave in checkpoints, mapped to inert types so that
# `torch.load(weights_only=True)` can read them without importing (or running) their code.
_INERT_GLOBALS = [
    (dict, "pytorch_lightning.utilities.parsing.AttributeDict"),
    (dict, "lightning.pytorch.utilities.parsing.AttributeDict"),
    (dict, "lightning.fabric.utilities.data.AttributeDict"),
    (dict, "lightning_fabric.utilities.data.AttributeDict"),
    (_HParams, "argparse.Namespace"),
]


@dataclass
class Checkpoint:
    """A checkpoint reduced to what matters here: the network's state dict and its training settings."""

    path: Path
    format: str
    state_dict: dict[str, torch.Tensor]
    hparams: dict[str, Any]
    sha256: str
    ignored_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _torch_load(path: Path, allow_pickle: bool) -> Any:
    if allow_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except ModuleNotFoundError as e:
            raise CheckpointError(
                f"{path}: unpickling needs the Python module {e.name!r}, which is not installed. "
                f"Install it, or re-save the checkpoint as a plain state dict."
            ) from e
    try:
        with torch.serialization.safe_globals(_INERT_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # a file the listing cannot read is damaged, not a pickle of code
            unsafe = []
        if not unsafe:
            # weights_only refuses a damaged pickle too; only a pickle that names code is a question of trust
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint ({_first_line(e)}). Is the file complete? Expected a "
                f"Lightning .ckpt, a .pth state dict or a .safetensors file."
            ) from e
        listed = f" ({', '.join(unsafe[:6])}{', ...' if len(unsafe) > 6 else ''})"
        raise CheckpointError(
            f"{path}: reading it would run pickled code{listed}; checkpoints are loaded without running code "
            f"by default. If you trust the file, pass --allow-pickle (Python: allow_pickle=True)."
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def _sniff_torch(path: Path, head: bytes) -> None:
    """Refuse, before torch.load, a file that is neither a torch zip archive nor a legacy pickle."""
    from .files import sniff_format

    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint: a zip archive whose end is missing. Is the file complete "
                f"(truncated, or still being copied)? Copy it again."
            )
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if not any(n.endswith("data.pkl") for n in names):
            raise CheckpointError(
                f"{path}: a zip archive but not a PyTorch checkpoint (no data.pkl among {len(names)} entries, e.g. "
                f"{', '.join(names[:3]) or 'none'}). Expected a Lightning .ckpt, a .pth state dict or a .safetensors file."
            )
        return
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return  # a pickle stream: torch's legacy format
    kind = sniff_format(head)
    seen = f"it looks like {kind}" if kind else (f"it starts with {head[:8]!r}" if head else "it is empty")
    raise CheckpointError(
        f"{path}: not a readable PyTorch checkpoint ({seen}). Expected a Lightning .ckpt, a .pth state dict or a "
        f".safetensors file."
    )


def _read_raw(path: Path, allow_pickle: bool) -> tuple[str, Any, dict[str, Any]]:
    """Return (container name, loaded object, safetensors metadata)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; pass the .ckpt, .pth or .safetensors file.")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{" and not zipfile.is_zipfile(path)):
        from safetensors import SafetensorError, safe_open

        try:
            tensors = {}
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}).") from e
        return "safetensors", tensors, meta
    _sniff_torch(path, head)
    try:
        obj = _torch_load(path, allow_pickle)
    except CheckpointError:
        raise
    except Exception as e:  # torch.load fails on foreign bytes with many exception types (KeyError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({first}). Is the file complete? Expected a Lightning "
            f".ckpt, a .pth state dict or a .safetensors file."
        ) from e
    return "torch", obj, {}


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _as_plain(hp: Any) -> dict[str, Any]:
    if hp is None:
        return {}
    if isinstance(hp, Mapping):
        return dict(hp)
    if hasattr(hp, "__dict__"):
        return dict(vars(hp))
    return {}


def _strip(sd: Mapping[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    out = dict(sd)
    for prefix in PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
            notes.append(f"stripped the {prefix!r} prefix")
    return out


def read_checkpoint(path: str | Path, allow_pickle: bool = False) -> Checkpoint:
    """Read any supported container and return the network's own state dict, unprefixed."""
    path = Path(path)
    kind, obj, meta = _read_raw(path, allow_pickle)
    notes: list[str] = []
    ignored: list[str] = []
    hparams: dict[str, Any] = {}
    if kind == "safetensors":
        fmt = "safetensors"
        sd = obj
        if "hyper_parameters" in meta:
            try:
                hparams = json.loads(meta["hyper_parameters"])
            except json.JSONDecodeError:
                notes.append("ignored unreadable hyper_parameters metadata")
        hparams.update({k: v for k, v in meta.items() if k in ("act_layer", "model_name")})
    elif isinstance(obj, torch.nn.Module):
        fmt, sd = "pickled module", obj.state_dict()
    elif _is_state_dict(obj):
        fmt, sd = "state dict", obj
    elif isinstance(obj, Mapping) and ("state_dict" in obj or "model" in obj):
        key = "state_dict" if "state_dict" in obj else "model"
        inner = obj[key]
        if isinstance(inner, torch.nn.Module):
            inner = inner.state_dict()
        if not _is_state_dict(inner):
            raise CheckpointError(f"{path}: {key!r} does not hold a state dict of tensors.")
        hparams = _as_plain(obj.get("hyper_parameters") or obj.get("hparams") or obj.get("args"))
        if key == "state_dict" and any(k.startswith(LIGHTNING_PREFIX) for k in inner):
            fmt = "lightning"
            sd = {k[len(LIGHTNING_PREFIX):]: v for k, v in inner.items() if k.startswith(LIGHTNING_PREFIX)}
            ignored = sorted(k for k in inner if not k.startswith(LIGHTNING_PREFIX))
        else:
            fmt, sd = f"{{'{key}': state dict}}", inner
    else:
        found = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(
            f"{path}: found no state dict (top level: {found}). Expected a Lightning .ckpt, a state dict, "
            f"or a dict with 'model' or 'state_dict'."
        )
    sd = _strip(sd, notes)
    require_finite_weights(sd, f"checkpoint {path}")
    if ignored:
        teacher = sum("teacher" in k for k in ignored)
        notes.append(
            f"ignored {len(ignored)} non-model keys" + (f" ({teacher} from a distillation teacher)" if teacher else "")
        )
    return Checkpoint(path, fmt, sd, hparams, file_sha256(path), ignored, notes)


def require_finite_weights(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise a CheckpointError naming the tensors of `what` that hold NaN or Inf: every logit would be NaN."""
    from .arrays import describe_tensors, nonfinite_tensors

    bad = nonfinite_tensors(tensors)
    if bad:
        raise CheckpointError(
            f"{what}: {len(bad)} tensor(s) hold NaN or Inf values: {describe_tensors(bad)}; every output would be "
            f"NaN. The training run probably diverged: use an earlier checkpoint."
        )


# --------------------------------------------------------------------------- architecture from the weights


def _blocks_of(sd: Mapping[str, torch.Tensor], stage_module: int) -> list[int]:
    pat = re.compile(rf"^stages\.{stage_module}\.blocks\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


def is_dpconv(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.endswith("spatial_mixing.gate") for k in sd)


def convert_dpconv(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DPConv (auto_div) blocks to the static partial conv the official eval computes (spec §5.3).

    The eval forward uses the top-left `one_channel` x `one_channel` block of the full kernel and passes the
    other channels through; `one_channel` is read from the buffer, as the official eval does.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = re.match(r"^(.*\.spatial_mixing)\.(gate|I|one|c_div|one_channel|conv\.weight)$", k)
        if not m:
            out[k] = v
            continue
        if m.group(2) == "conv.weight":
            prefix = m.group(1)
            oc_key = f"{prefix}.one_channel"
            if oc_key not in sd:
                raise CheckpointError(f"DPConv block {prefix} has no one_channel buffer; cannot convert it.")
            dc = int(sd[oc_key].item())
            if not 0 < dc <= v.shape[0]:
                raise CheckpointError(f"DPConv block {prefix}: one_channel={dc} is outside 1..{v.shape[0]}.")
            out[f"{prefix}.partial_conv3.weight"] = v[:dc, :dc].contiguous()
    return out


@dataclass
class Inferred:
    """An architecture read off a state dict, and how each field was decided."""

    config: ArchConfig
    sources: dict[str, str]
    notes: list[str]


def infer_config(
    sd: Mapping[str, torch.Tensor],
    act: str,
    act_source: str,
    *,
    spatial_attn: bool | None = None,
    dpconv: bool = False,
) -> Inferred:
    """Read embed width, depths, per-block partial widths, heads, PAT_sp and classes from the shapes."""
    if "patch_embed.proj.weight" not in sd:
        sample = ", ".join(list(sd)[:4])
        raise CheckpointError(
            f"this is not a PartialNet state dict: no patch_embed.proj.weight among {len(sd)} keys ({sample}, ...)."
        )
    notes: list[str] = []
    embed = int(sd["patch_embed.proj.weight"].shape[0])
    depths = tuple(len(_blocks_of(sd, s)) for s in STAGE_MODULES)
    if any(d == 0 for d in depths):
        raise CheckpointError(
            f"the checkpoint has no blocks in stage(s) {[i for i, d in enumerate(depths) if d == 0]} "
            f"(depths read: {depths}); it is truncated or not a PartialNet classifier."
        )
    dpconv = dpconv or is_dpconv(sd)
    partial: list[tuple[int, ...]] = []
    for i, s in enumerate(STAGE_MODULES):
        dims = []
        for j in _blocks_of(sd, s):
            w = sd.get(f"stages.{s}.blocks.{j}.spatial_mixing.partial_conv3.weight")
            if w is None:
                raise CheckpointError(f"stages.{s}.blocks.{j} has no spatial_mixing.partial_conv3.weight.")
            dims.append(int(w.shape[0]))
        partial.append(tuple(dims))
    default_dims = all(d == (embed * 2**i) // 4 for i, st in enumerate(partial) for d in st)
    heads = next((int(v.shape[0]) for k, v in sd.items() if k.endswith("rpe_k.lookup_table_bias")), 4)
    has_sp = any(k.endswith("mlp.4.conv_attn.weight") for k in sd)
    head_w = sd.get("head.weight")
    if head_w is None:
        raise CheckpointError("the checkpoint has no head.weight: it is a backbone (fork_feat) or truncated.")
    mlp0 = sd.get("stages.0.blocks.0.mlp.0.weight")
    mlp_ratio = int(mlp0.shape[0] // embed) if mlp0 is not None else 2
    sources = {
        "embed_dim": "checkpoint",
        "depths": "checkpoint",
        "partial_dims": "checkpoint",
        "num_heads": "checkpoint",
        "num_classes": "checkpoint",
        "spatial_attn": "checkpoint",
        "act": act_source,
    }
    if spatial_attn is not None and spatial_attn != has_sp:
        sources["spatial_attn"] = "command line"
        notes.append(f"PAT_sp forced {'on' if spatial_attn else 'off'}; the checkpoint has it {'on' if has_sp else 'off'}")
    if dpconv:
        notes.append("DPConv blocks converted to static partial convs (spec §5.3)")
    cfg = ArchConfig(
        embed_dim=embed,
        depths=depths,  # type: ignore[arg-type]
        act=act,  # type: ignore[arg-type]
        spatial_attn=has_sp if spatial_attn is None else spatial_attn,
        num_heads=heads,
        num_classes=int(head_w.shape[0]),
        feature_dim=int(head_w.shape[1]),
        mlp_ratio=mlp_ratio,
        partial_dims=None if default_dims else tuple(partial),
        mixing="pconv" if dpconv else "pat",
    )
    return Inferred(cfg, sources, notes)


def act_from_hparams(hparams: Mapping[str, Any]) -> str | None:
    """The activation recorded at training time ('GELU' / 'RELU' in the official cfgs), if any."""
    raw = hparams.get("act_layer")
    if raw is None:
        return None
    name = str(raw).lower()
    if "gelu" in name:
        return "gelu"
    if "relu" in name:
        return "relu"
    raise CheckpointError(f"hyper_parameters act_layer={raw!r} is neither GELU nor ReLU.")


# --------------------------------------------------------------------------- strict matching


_ROLES = (
    (".mlp.4.", "PAT_sp"),
    (".spatial_mixing.attn.rpe_k", "PAT_sf iRPE"),
    (".spatial_mixing.attn.qkv", "PAT_sf"),
    (".spatial_mixing.attn.proj", "PAT_sf"),
    (".spatial_mixing.attn.cfc1", "PAT_ch"),
    (".spatial_mixing.attn.bn", "PAT_ch"),
    (".spatial_mixing.gate", "DPConv"),
    ("teacher", "distillation teacher"),
    ("head.", "classifier"),
)


def _module_of(key: str) -> str:
    """The module a key belongs to (PAT_sp collapsed to mlp.4)."""
    if ".mlp.4." in key:
        return key[: key.index(".mlp.4.") + len(".mlp.4")]
    return key.rsplit(".", 1)[0] if "." in key else key


def _index_set(values: set[int], wildcard_over: int = 3) -> str:
    ordered = sorted(values)
    if len(ordered) == 1:
        return str(ordered[0])
    return "*" if len(ordered) > wildcard_over else "{" + ",".join(map(str, ordered)) + "}"


def group_keys(keys: list[str]) -> list[str]:
    """Summarize keys as 'stages.{0,2}.blocks.*.mlp.4.*: 24 keys (PAT_sp)' lines, one per module pattern."""
    groups: dict[str, dict[str, Any]] = defaultdict(lambda: {"stages": set(), "blocks": set(), "count": 0, "role": ""})
    for k in keys:
        mod = _module_of(k)
        m = re.match(r"^stages\.(\d+)\.(?:blocks\.(\d+)\.)?(.*)$", mod)
        if m:
            pattern = "stages.{s}." + ("blocks.{b}." if m.group(2) is not None else "") + m.group(3)
        else:
            pattern = mod
        g = groups[pattern]
        g["count"] += 1
        if m:
            g["stages"].add(int(m.group(1)))
            if m.group(2) is not None:
                g["blocks"].add(int(m.group(2)))
        g["role"] = next((r for needle, r in _ROLES if needle in k), "")
    lines = []
    for pattern, g in sorted(groups.items()):
        label = pattern
        if g["stages"]:
            label = pattern.format(s=_index_set(g["stages"], 4), b=_index_set(g["blocks"]) if g["blocks"] else "")
        role = f" ({g['role']})" if g["role"] else ""
        lines.append(f"{label}.*: {g['count']} key{'s' if g['count'] != 1 else ''}{role}")
    return lines


def _bookkeeping(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def match_state_dict(
    model: torch.nn.Module, sd: Mapping[str, torch.Tensor], *, what: str, hint: str = ""
) -> dict[str, torch.Tensor]:
    """Check keys and shapes exactly; return the dict ready for `load_state_dict(strict=True)`.

    Only BatchNorm's `num_batches_tracked` counters may be absent (they carry no weights).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not _bookkeeping(k)]
    unexpected = [k for k in sd if k not in expected]
    wrong_shape = [
        f"{k}: checkpoint {list(sd[k].shape)}, model {list(expected[k].shape)}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong_shape:
        parts = [f"{what} does not match the architecture ({len(sd)} keys in the checkpoint, {len(expected)} expected)."]
        if missing:
            parts.append(f"Missing {len(missing)}: " + "; ".join(group_keys(missing)) + ".")
        if unexpected:
            parts.append(f"Unexpected {len(unexpected)}: " + "; ".join(group_keys(unexpected)) + ".")
        if wrong_shape:
            more = f" (and {len(wrong_shape) - 5} more)" if len(wrong_shape) > 5 else ""
            parts.append(f"Wrong shape {len(wrong_shape)}: " + "; ".join(wrong_shape[:5]) + more + ".")
        if hint:
            parts.append(hint)
        raise CheckpointError(" ".join(parts))
    full = dict(sd)
    for k, v in expected.items():
        if k not in full:
            full[k] = torch.zeros_like(v)
    return full
