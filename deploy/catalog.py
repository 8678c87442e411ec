"""What `deploy list` and `deploy info` show: variants, their size and cost, and what a checkpoint holds."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from partialnet.config import variant_config
from partialnet.cost import mac_count, param_count
from partialnet.resources import require_memory
from partialnet.variants import IMAGENET, VARIANTS
from partialnet.zoo_table import ZOO

if TYPE_CHECKING:
    from partialnet import LoadedModel


def variant_rows() -> list[dict[str, Any]]:
    """One row per variant; params and MACs with PAT_sp (the default) and without (the published cfgs)."""
    rows = []
    for v in VARIANTS.values():
        with_sp, without = variant_config(v, spatial_attn=True), variant_config(v, spatial_attn=False)
        rows.append(
            {
                "variant": v.name,
                "embed_dim": v.embed_dim,
                "depths": list(v.depths),
                "act": v.act,
                "heads": v.num_heads,
                "pat_sp_default": v.spatial_attn,
                "params_m": round(param_count(with_sp) / 1e6, 3),
                "params_m_no_sp": round(param_count(without) / 1e6, 3),
                "macs_m_224": round(mac_count(with_sp, 224) / 1e6, 1),
                "macs_m_224_no_sp": round(mac_count(without, 224) / 1e6, 1),
                "input_size": v.preprocess.input_size,
                "preprocess": f"resize {v.preprocess.resize_size} {v.preprocess.interpolation}, crop {v.preprocess.input_size}",
            }
        )
    return rows


def zoo_rows() -> list[dict[str, Any]]:
    """One row per plug-in zoo model (exportable by name, fresh weights or --weights); counts from the table."""
    return [
        {
            "variant": m.name,
            "kind": "zoo",
            "params_m": round(m.params / 1e6, 3),
            "macs_m_224": round(m.macs_224 / 1e6, 1),
            "input_size": IMAGENET.input_size,
            "about": m.about,
        }
        for m in ZOO.values()
    ]


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[str(c) for c in cols]] + [[_fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells)


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "-".join(map(str, v))
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def model_info(lm: "LoadedModel", input_size: int) -> dict[str, Any]:
    from partialnet.profile import count_macs, count_params

    cfg = lm.config
    require_memory(cfg, input_size, 1, f"--input-size {input_size}")
    info: dict[str, Any] = {
        "variant": lm.variant.name,
        "architecture": cfg.to_dict(),
        "sources": lm.sources,
        "params": count_params(lm.model),
        "macs": count_macs(lm.model, input_size),
        "input_size": input_size,
        "preprocess": lm.variant.preprocess.at(input_size).to_dict(),
        "notes": lm.notes,
    }
    if lm.checkpoint is not None:
        ck = lm.checkpoint
        info["checkpoint"] = {
            "path": str(ck.path),
            "format": ck.format,
            "sha256": ck.sha256,
            "keys": len(ck.state_dict),
            "ignored_keys": len(ck.ignored_keys),
            "hyper_parameters": {k: ck.hparams[k] for k in sorted(ck.hparams) if _plain(ck.hparams[k])},
        }
    return info


def _plain(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool, type(None))) or (
        isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v)
    )


def format_info(info: dict[str, Any]) -> str:
    a = info["architecture"]
    src = info["sources"]
    lines = [
        f"variant       {info['variant']}",
        f"embed_dim     {a['embed_dim']}  ({src.get('embed_dim', '')})",
        f"depths        {'-'.join(map(str, a['depths']))}  ({src.get('depths', '')})",
        f"act           {a['act']}  ({src.get('act', '')})",
        f"PAT_sp        {'on' if a['spatial_attn'] else 'off'}  ({src.get('spatial_attn', '')})",
        f"heads         {a['num_heads']}",
        f"classes       {a['num_classes']}  ({src.get('num_classes', '')})",
        f"partial dims  {'C/4 everywhere' if a['partial_dims'] is None else a['partial_dims']}",
        f"mixing        {'PATConv (PAT_ch / PAT_sf)' if a['mixing'] == 'pat' else 'plain partial conv (from DPConv)'}",
        f"params        {info['params'] / 1e6:.3f} M",
        f"MACs          {info['macs'] / 1e6:.1f} M at {info['input_size']} px",
        f"preprocess    resize {info['preprocess']['resize_size']} {info['preprocess']['interpolation']}, "
        f"center-crop {info['input_size']}, ImageNet mean/std",
    ]
    if "checkpoint" in info:
        ck = info["checkpoint"]
        lines += [
            f"checkpoint    {ck['path']} ({ck['format']}, {ck['keys']} keys, sha256 {ck['sha256'][:16]}...)",
        ]
        if ck["hyper_parameters"]:
            shown = {k: ck["hyper_parameters"][k] for k in list(ck["hyper_parameters"])[:12]}
            lines.append(f"hparams       {shown}")
    for note in info["notes"]:
        lines.append(f"note          {note}")
    return "\n".join(lines)
