"""What this CPU offers that changes how a CPU backend computes: /proc/cpuinfo flags, and whether int8 dot products
saturate here.

x86 CPUs without VNNI (or AMX) multiply uint8 activations by int8 weights with VPMADDUBSW, which adds each pair of
neighbouring products in *saturating* 16-bit arithmetic: 2 x 255 x 127 = 64770 is clamped to 32767. ONNX Runtime's
and OpenVINO's default int8 kernels both take that path on such CPUs, and the error is far beyond rounding noise
(benchmarks/DECISIONS.md has the measurements). VNNI's VPDPBUSD accumulates in 32 bits and AMX likewise.
"""
from __future__ import annotations

import os
import platform
from functools import lru_cache

# Extensions that add int8 dot products accumulating in 32 bits (no 16-bit intermediate).
EXACT_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpuinfo(keys: tuple[str, ...]) -> dict[str, str]:
    """The first value of each of these /proc/cpuinfo keys (empty where there is no such file)."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in keys and key not in found:
                    found[key] = value.strip()
    except OSError:
        pass
    return found


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity), not every CPU of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@lru_cache(maxsize=1)
def x86_flags() -> frozenset[str] | None:
    """The x86 feature flags of this CPU, or None when this is not an x86 CPU or they cannot be read."""
    if not is_x86():
        return None
    flags = cpuinfo(("flags",)).get("flags")
    return frozenset(flags.split()) if flags else None


def int8_dot_saturates(flags: frozenset[str] | None = None) -> bool:
    """True on an x86 CPU whose int8 kernels add u8 x s8 products in saturating 16-bit arithmetic (no VNNI/AMX).

    Unknown flags (no /proc/cpuinfo on x86) count as saturating: assuming an exact CPU is the unsafe guess.
    """
    if flags is None:
        if not is_x86():
            return False  # ARM's SDOT/UDOT and other ISAs accumulate in 32 bits
        flags = x86_flags()
        if flags is None:
            return True
    return not any(f in flags for f in EXACT_INT8_FLAGS)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which a container or taskset narrows), at least 1."""
    import os

    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def check_threads(threads: int | None) -> int | None:
    """Refuse a thread count above the usable CPUs: runtimes cap it silently (OpenVINO) or oversubscribe the cores
    (ONNX Runtime, torch), and either way a latency figure measured with it is not what was asked for."""
    from partialnet.errors import UsageError

    if threads is None:
        return None
    if threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}.")
    usable = usable_cpus()
    if threads > usable:
        raise UsageError(f"--threads {threads} is more than the {usable} CPU(s) this process can use here; pass at "
                         f"most --threads {usable}, or leave it out for each runtime's default.")
    return threads
