"""Memory a forward pass needs, estimated before the work starts, against the memory this process can use.

The estimate is arithmetic on the architecture, not a measurement: the widest feature maps of the convolutional
stages (they grow with the square of the input size) and the last stage's attention (tokens = (N/32)^2, so its
score matrices grow with the fourth power). It is meant to refuse a request that cannot fit (an --input-size of
4096, a batch of 20000) with the figures and the largest size that fits, not to account for every byte.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .files import human_bytes
from .config import ArchConfig

BYTES = 4  # float32
# Live feature maps at the peak of a block, in units of one map of the stage's width: the input, the MLP's two
# hidden maps (mlp_ratio wide each), the output and the partial-mixing and spatial-gate temporaries.
LIVE_MAPS = 4
# Copies of the [batch, heads, n, n] attention scores alive at once (scores, + bias, softmax), plus the constant
# bias and its int64 bucket ids.
SCORE_COPIES = 3
FRAMEWORK_OVERHEAD = 1.25  # allocator slack and a runtime's own workspace (measured peaks are 0.5-0.6x this estimate)
USABLE_FRACTION = 0.8  # of the available memory: the rest is left for the OS and the libraries


@dataclass(frozen=True)
class Estimate:
    bytes: int
    input_size: int
    batch: int
    attention_tokens: int

    def __str__(self) -> str:
        return human_bytes(self.bytes)


def forward_memory(cfg: ArchConfig, input_size: int, batch: int) -> Estimate:
    """Bytes of activations and inputs one forward pass at `input_size` px and `batch` images needs."""
    images = batch * 3 * input_size**2 * BYTES
    maps = 0
    for i in range(4):
        side = input_size // (4 * 2**i)
        width = cfg.stage_dim(i) * (1 + cfg.mlp_ratio)
        maps = max(maps, batch * LIVE_MAPS * width * side**2 * BYTES)
    tokens = (input_size // 32) ** 2
    attention = (batch * SCORE_COPIES + 1) * cfg.num_heads * tokens**2 * BYTES + 8 * tokens**2
    if cfg.mixing == "pconv":
        attention = 0
    total = int(FRAMEWORK_OVERHEAD * (2 * images + maps + attention))
    return Estimate(total, input_size, batch, tokens)


def available_memory() -> int | None:
    """Bytes this process can still allocate: the smaller of MemAvailable and the cgroup's limit minus its use."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:
                found.append(max(0, int(limit) - int(Path(usage_file).read_text().strip())))
            break
        except (OSError, ValueError):
            continue
    override = os.environ.get("PARTIALNET_MEMORY_LIMIT")  # bytes; lets a test or a shared machine set the budget
    if override and override.isdigit():
        found.append(int(override))
    return min(found) if found else None


def largest_fitting_size(cfg: ArchConfig, batch: int, budget: int) -> int | None:
    """The largest multiple of 32 whose forward pass at `batch` fits in `budget` bytes (None: not even 32)."""
    best = None
    size = 32
    while forward_memory(cfg, size, batch).bytes <= budget:
        best = size
        size += 32
    return best


def largest_fitting_batch(cfg: ArchConfig, input_size: int, budget: int) -> int:
    lo, hi = 0, 1
    while forward_memory(cfg, input_size, hi).bytes <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if forward_memory(cfg, input_size, mid).bytes <= budget else (lo, mid)
    return lo


def require_memory(cfg: ArchConfig, input_size: int, batch: int, what: str) -> Estimate:
    """Refuse, before any work, a forward pass whose estimated memory exceeds what is available here.

    `what` names the request in the message ("deploy bench --batch-sizes 20000").
    """
    est = forward_memory(cfg, input_size, batch)
    avail = available_memory()
    if avail is None:
        return est
    budget = int(avail * USABLE_FRACTION)
    if est.bytes <= budget:
        return est
    size = largest_fitting_size(cfg, batch, budget)
    most = largest_fitting_batch(cfg, input_size, budget)
    fits = []
    if size is not None and size != input_size:
        fits.append(f"--input-size {size} at batch {batch}")
    if most >= 1 and most != batch:
        fits.append(f"batch {most} at {input_size} px")
    advice = f"the largest that fits: {' or '.join(fits)}" if fits else "nothing this large fits here"
    attn = (f", {est.attention_tokens} attention tokens in the last stage" if est.attention_tokens > 1024 else "")
    raise UsageError(
        f"{what}: a forward pass at {input_size} px and batch {batch} needs about {est} of memory (estimated{attn}), "
        f"but only {human_bytes(avail)} is available here; {advice}."
    )


def config_from_dict(arch: dict) -> ArchConfig:
    """The ArchConfig a manifest's "architecture" records (unknown keys ignored, lists back to tuples)."""
    fields = ArchConfig.__dataclass_fields__
    kw = {k: v for k, v in arch.items() if k in fields}
    if "depths" in kw:
        kw["depths"] = tuple(kw["depths"])
    if kw.get("partial_dims") is not None:
        kw["partial_dims"] = tuple(tuple(s) for s in kw["partial_dims"])
    return ArchConfig(**kw)
