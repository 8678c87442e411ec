"""A report: named sections of plain data, gates with every failure listed, JSON and Markdown renderings."""
from __future__ import annotations

import copy
import json
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from runtimes.cpu import cpuinfo, int8_dot_saturates

# Instruction-set extensions that change what a CPU backend computes and how fast (x86, then ARM).
ISA_FLAGS = {
    "flags": ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
              "amx_bf16", "amx_int8"),
    "Features": ("asimd", "asimddp", "asimdhp", "sve", "sve2", "i8mm", "bf16"),
}


def cpu_model() -> str:
    return cpuinfo(("model name",)).get("model name") or platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def _fingerprint() -> dict[str, Any]:
    return _measure_fingerprint()


def machine_fingerprint() -> dict[str, Any]:
    """What a drift or latency figure depends on: CPU model and ISA extensions, usable CPUs, GPUs, library versions.

    One schema for every report (export, validation, bench); read once per process.
    """
    return copy.deepcopy(_fingerprint())


def _measure_fingerprint() -> dict[str, Any]:
    import torch

    from export.manifest import tool_versions

    info = cpuinfo(tuple(ISA_FLAGS))
    isa: dict[str, bool] | str = "unknown (no /proc/cpuinfo)"
    for key, flags in ISA_FLAGS.items():
        if key in info:
            have = set(info[key].split())
            isa = {flag: flag in have for flag in flags}
            break
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return {
        "cpu": cpu_model(),
        "isa": isa,
        "int8_dot_saturates": int8_dot_saturates(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpus or None,
        "platform": platform.platform(),
        "libraries": tool_versions(),
    }


def isa_summary(env: dict[str, Any]) -> str:
    """The extensions a fingerprint found, on one line."""
    if isinstance(env["isa"], str):
        return env["isa"]
    return ", ".join(k for k, v in env["isa"].items() if v) or "none of those listed"


@dataclass
class Report:
    """Named sections of plain data, gates with every failure, and the machine (`machine_fingerprint`)."""

    title: str
    sections: dict[str, Any] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def environment(self) -> dict[str, Any]:
        return machine_fingerprint()

    def section(self, name: str, data: Any) -> None:
        self.sections[name] = data

    def gate(self, name: str, failures: list[str]) -> None:
        self.gates.append({"name": name, "passed": not failures, "failures": list(failures)})

    @property
    def failures(self) -> list[str]:
        return [f"{g['name']}: {f}" for g in self.gates for f in g["failures"]]

    @property
    def failed(self) -> bool:
        return any(not g["passed"] for g in self.gates)

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "created": self.created,
            "passed": not self.failed,
            "gates": self.gates,
            "sections": self.sections,
            "environment": self.environment,
            "manifest": self.manifest,
        }

    def to_document(self) -> dict[str, Any]:
        """The flat form `deploy validate/bench --json` print: sections at the top level, the machine last."""
        doc: dict[str, Any] = {"title": self.title, "created": self.created, "passed": not self.failed,
                               "gates": self.gates, "failures": self.failures}
        doc.update(self.sections)
        doc["environment"] = self.environment
        return doc

    def to_markdown(self) -> str:
        lines = [f"# {self.title}", "", f"Created {self.created}. Result: **{'PASSED' if not self.failed else 'FAILED'}**.", ""]
        if self.gates:
            lines += ["## Gates", "", "| check | result | detail |", "|---|---|---|"]
            for g in self.gates:
                lines.append(f"| {g['name']} | {'pass' if g['passed'] else 'FAIL'} | {'; '.join(g['failures']) or '-'} |")
            lines.append("")
        for name, data in self.sections.items():
            lines += [f"## {name.replace('_', ' ').capitalize()}", "", _md(data), ""]
        lines += ["## Environment", "", _md(self.environment), ""]
        return "\n".join(lines)


def _md(data: Any, depth: int = 0) -> str:
    pad = "  " * depth
    if isinstance(data, dict) and data and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data.values()) and len(data) > 6:
        return pad + ", ".join(f"{k} {_scalar(v)}" for k, v in data.items())  # e.g. op counts on one line
    if isinstance(data, dict):
        out = []
        for k, v in data.items():
            if isinstance(v, (dict, list)) and v:
                out.append(f"{pad}- **{k}**:")
                out.append(_md(v, depth + 1))
            else:
                out.append(f"{pad}- **{k}**: {_scalar(v)}")
        return "\n".join(out)
    if isinstance(data, list):
        return "\n".join(f"{pad}- {_scalar(v) if not isinstance(v, (dict, list)) else json.dumps(v)}" for v in data)
    return f"{pad}{_scalar(data)}"


def _scalar(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)
