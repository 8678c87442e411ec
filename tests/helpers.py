"""Test helpers shared by several test files."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn


def noise_class_folders(root: Path, names: Sequence[str], per_class: int, seed: int,
                        shape: tuple[int, int] = (72, 90)) -> Path:
    """One subfolder per name holding `per_class` noise PNGs (0.png, 1.png, ...), seeded: a labelled image folder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in names:
        (root / name).mkdir()
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomize BN statistics and affines, LayerNorm affines and the iRPE tables, in place.

    A fresh BatchNorm is nearly the identity and a fresh iRPE table is zero, so without this a wrong fold or a
    wrong bias gather would still pass.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(shape, lo, hi):
        return torch.rand(shape, generator=gen) * (hi - lo) + lo

    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):  # BatchNorm1d/2d
                m.running_mean.copy_(rand(m.running_mean.shape, -0.5, 0.5))
                m.running_var.copy_(rand(m.running_var.shape, 0.5, 2.0))
                m.weight.copy_(rand(m.weight.shape, 0.5, 1.5))
                m.bias.copy_(rand(m.bias.shape, -0.3, 0.3))
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(rand(m.weight.shape, 0.5, 1.5))
                m.bias.copy_(rand(m.bias.shape, -0.3, 0.3))
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / fan_in**0.5)
                if m.bias is not None:
                    m.bias.copy_(rand(m.bias.shape, -0.1, 0.1))
            if hasattr(m, "lookup_table_bias"):
                m.lookup_table_bias.copy_(torch.randn(m.lookup_table_bias.shape, generator=gen))
    return model


class LoggingRunner:
    """A runner for the benchmark's method tests, built inside a worker process from a picklable partial.

    Each call spins the CPU for `call_s` and appends `call START END` (time.monotonic, system-wide) to `log`. With
    `spin_after_s`, each call also leaves a thread spinning for that long after it returns, as a thread pool that
    does not park would, and logs `spin START END`."""

    def __init__(self, log: str, call_s: float = 0.002, spin_after_s: float = 0.0):
        from runtimes.base import INPUT_NAME, OUTPUT_NAME, TensorSpec

        self.log, self.call_s, self.spin_after_s = log, call_s, spin_after_s
        self.name = f"logging:{spin_after_s}"
        self.inputs = [TensorSpec(INPUT_NAME, "float32", (None, 3, None, None))]
        self.outputs = [TensorSpec(OUTPUT_NAME, "float32", (None, 2))]
        self.options = {"threads": 1}
        self._out = OUTPUT_NAME
        self._spinner = None

    @staticmethod
    def _burn(seconds: float) -> tuple[float, float]:
        import time

        start = time.monotonic()
        while time.monotonic() - start < seconds:
            pass
        return start, time.monotonic()

    def _write(self, kind: str, start: float, end: float) -> None:
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(f"{kind} {start:.6f} {end:.6f}\n")

    def run(self, feeds):
        import threading

        import numpy as np

        if self._spinner is not None:
            self._spinner.join()  # one spinner at a time, as one pool
        self._write("call", *self._burn(self.call_s))
        if self.spin_after_s:
            self._spinner = threading.Thread(target=lambda: self._write("spin", *self._burn(self.spin_after_s)))
            self._spinner.start()
        n = next(iter(feeds.values())).shape[0]
        return {self._out: np.zeros((n, 2), np.float32)}

    def close(self) -> None:
        if self._spinner is not None:
            self._spinner.join()


def read_intervals(path) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {"call": [], "spin": []}
    for line in open(path, encoding="utf-8"):
        kind, start, end = line.split()
        out[kind].append((float(start), float(end)))
    return out
