"""The PyTorch model itself: the reference every other backend is compared against."""
from __future__ import annotations

import copy
from typing import Any, Mapping

import numpy as np
import torch

from .base import INPUT_NAME, OUTPUT_NAME, TensorSpec, check_feeds


class EagerRunner:
    """Runs a PartialNet in eval mode, fp32, on the CPU (or a given torch device)."""

    def __init__(self, model: torch.nn.Module, input_size: int | None = None, *, num_classes: int | None = None,
                 threads: int | None = None, device: str = "cpu"):
        self.model = model.eval().to(device)
        self.device = device
        if threads:
            from .cpu import check_threads

            torch.set_num_threads(check_threads(threads))
        self.input_size = input_size
        n_cls = num_classes if num_classes is not None else getattr(getattr(model, "cfg", None), "num_classes", None)
        self.name = f"eager:{device}:fp32"
        self.inputs = [TensorSpec(INPUT_NAME, "float32", (None, 3, input_size, input_size))]
        self.outputs = [TensorSpec(OUTPUT_NAME, "float32", (None, n_cls))]
        self.options: dict[str, Any] = {"threads": torch.get_num_threads(), "device": device}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.inputs, feeds, multiple_of=32)
        cfg = getattr(self.model, "cfg", None)
        if cfg is not None and hasattr(cfg, "stage_dim"):  # a PartialNet's ArchConfig (a user's model may have a cfg)
            from partialnet.resources import require_memory

            x = feeds[INPUT_NAME]
            require_memory(cfg, max(x.shape[2:]), x.shape[0], f"{self.name} on {x.shape[0]} image(s)")
        with torch.inference_mode():
            out = self.model(torch.from_numpy(feeds[INPUT_NAME]).to(self.device))
        return {OUTPUT_NAME: out.float().cpu().numpy()}

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]


class NoiseFloor:
    """Max |logit| difference between the model in fp32 and in float64 on the same images: its own rounding error.

    Any reordering of the arithmetic, exact in real numbers, moves the logits by about this much. The float64 copy
    is made once; `of` measures one batch (the floor of a set is the max over its batches).
    """

    def __init__(self, model: torch.nn.Module):
        self.m64 = copy.deepcopy(model).double().eval()

    def of(self, x: np.ndarray, fp32_logits: np.ndarray) -> float:
        with torch.inference_mode():
            ref64 = self.m64(torch.from_numpy(np.ascontiguousarray(x)).double()).numpy()
        return float(np.abs(fp32_logits.astype(np.float64) - ref64).max())


def fp32_noise_floor(model: torch.nn.Module, x: np.ndarray, fp32_logits: np.ndarray, batch_size: int = 16) -> float:
    """NoiseFloor over the batches of `x` at once."""
    floor = NoiseFloor(model)
    return max((floor.of(x[i : i + batch_size], fp32_logits[i : i + batch_size]) for i in range(0, len(x), batch_size)),
               default=0.0)
