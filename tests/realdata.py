"""A real-data test fixture: a small PartialNet trained on scikit-learn's handwritten digits.

The digits (1,797 real 8x8 grayscale scans, 10 classes) ship inside the scikit-learn wheel, so nothing is
downloaded. The fixture is built once and cached under `$PARTIALNET_TEST_CACHE/digits-v1/`, or
`tests/.cache/digits-v1/` when the variable is unset:

    digits-v1/
        fixture.json          written last: its presence marks a complete cache
        digits.ckpt           Lightning-style checkpoint ('model.' prefix, hyper_parameters)
        train/0 .. train/9/   1,347 RGB PNGs, 72 x 72
        test/0 .. test/9/     450 RGB PNGs, 72 x 72

Parallel test processes share one build through a lock file beside the folder; the folder is built under a
temporary name and renamed into place, so an interrupted build never looks complete. Bump VERSION whenever the
recipe below changes.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from calibration.sources import load_images
from partialnet import ArchConfig, PartialNet, Preprocess
from partialnet.build import init_weights

VERSION = "digits-v1"
CACHE_ENV = "PARTIALNET_TEST_CACHE"
DEFAULT_CACHE_ROOT = Path(__file__).resolve().parent / ".cache"
MARKER = "fixture.json"

VARIANT = "partialnet_t0"
INPUT_SIZE = 64  # not the variants' 224; stage 3 works on 2 x 2 maps
# 8x8 scans upscaled 9x with bilinear; preprocessing resizes 72 -> int(64 / 0.9) = 71 and center-crops 64,
# which trims less than half a scan pixel per side, and the scans' border columns are background anyway.
IMAGE_SIZE = 72
UPSCALE = Image.Resampling.BILINEAR
NUM_TEST = 450
SEED = 0

# T0's block layout (PAT_ch in stages 0-2, PAT_sf in stage 3, PAT_sp in every MLP, GELU) at a width and depth
# that trains in 7-110 s on two shared CPU cores (idle to heavily loaded).
ARCH = ArchConfig(embed_dim=16, depths=(1, 1, 2, 1), act="gelu", spatial_attn=True, num_classes=10, feature_dim=128)
EPOCHS = 5
BATCH_SIZE = 64
LR = 4e-3
WEIGHT_DECAY = 0.05
MAX_SHIFT = 4  # random translation in pixels of the 64 x 64 input, the only augmentation


@dataclass(frozen=True)
class DigitsFixture:
    """Paths and facts of the cached digits model; `eager_top1` was measured with the deploy preprocessing."""

    checkpoint: Path
    train_dir: Path
    test_dir: Path
    input_size: int
    variant: str
    eager_top1: float
    num_train: int
    num_test: int

    @property
    def preprocess(self) -> Preprocess:
        """The deploy preprocessing at this fixture's input size."""
        return Preprocess(input_size=self.input_size)


def cache_folder(root: str | Path | None = None) -> Path:
    """Where the fixture lives: `<root>/digits-v1`, root from the argument, $PARTIALNET_TEST_CACHE or tests/.cache."""
    base = Path(root) if root is not None else Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT)
    return base / VERSION


def digits_fixture(root: str | Path | None = None) -> DigitsFixture:
    """The cached fixture, built by the first caller only (seconds to two minutes of CPU)."""
    folder = cache_folder(root)
    found = _read(folder)
    if found is not None:
        return found
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _read(folder)  # another process may have built it while this one waited
        if found is None:
            _build_atomically(folder)
            found = _read(folder)
    if found is None:
        raise RuntimeError(f"built the digits fixture in {folder} but cannot read its {MARKER} back.")
    return found


def cached_fixture(root: str | Path | None = None) -> DigitsFixture | None:
    """The fixture if a complete cache exists, else None; never builds."""
    return _read(cache_folder(root))


def measure_top1(model: nn.Module, folder: str | Path, input_size: int, batch_size: int = 50) -> float:
    """Top-1 of an eval-mode model on a class-subfolder image folder, read through the deploy preprocessing."""
    data = load_images(folder, Preprocess(input_size=input_size))
    if data.labels is None:
        raise ValueError(f"{folder} has no class subfolders, so there are no labels to score against.")
    model.eval()
    with torch.inference_mode():
        logits = torch.cat([model(torch.from_numpy(data.images[i : i + batch_size]))
                            for i in range(0, len(data), batch_size)])
    return float(np.mean(logits.argmax(1).numpy() == data.labels))


# --------------------------------------------------------------------------- cache


def _read(folder: Path) -> DigitsFixture | None:
    """The fixture recorded in a complete cache folder, or None if the folder is absent, partial or stale."""
    try:
        record = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        if record.get("version") != VERSION:
            return None
        f = record["fixture"]
        fixture = DigitsFixture(
            checkpoint=folder / f["checkpoint"],
            train_dir=folder / f["train_dir"],
            test_dir=folder / f["test_dir"],
            input_size=int(f["input_size"]),
            variant=str(f["variant"]),
            eager_top1=float(f["eager_top1"]),
            num_train=int(f["num_train"]),
            num_test=int(f["num_test"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (fixture.checkpoint.is_file() and fixture.train_dir.is_dir() and fixture.test_dir.is_dir()):
        return None
    return fixture


def _build_atomically(folder: Path) -> None:
    """Build into a temporary sibling, write the marker last, then rename it into place. Caller holds the lock."""
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):  # left by killed builds
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would keep a shared cache private to its builder
    print(f"building the digits fixture in {folder} (seconds on an idle CPU, up to two minutes on a busy one)",
          file=sys.stderr)
    try:
        record = _build(tmp)
        (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if folder.exists():  # incomplete or unreadable: _read rejected it
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        print(f"built the digits fixture: held-out top-1 {record['fixture']['eager_top1']:.4f}, "
              f"trained in {record['recipe']['train_seconds']} s", file=sys.stderr)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- recipe


def _build(out: Path) -> dict[str, Any]:
    """Write the image folders, train, measure and save; return what fixture.json records."""
    import sklearn

    num_train, num_test = _write_folders(out / "train", out / "test")
    train = load_images(out / "train", Preprocess(input_size=INPUT_SIZE))
    if train.labels is None:
        raise RuntimeError(f"{out / 'train'} lost its class subfolders between writing and reading.")
    start = time.perf_counter()
    model, steps = _train(train.images, train.labels)
    seconds = time.perf_counter() - start
    top1 = measure_top1(model, out / "test", INPUT_SIZE)
    _save_checkpoint(model, out / "digits.ckpt", steps)
    return {
        "version": VERSION,
        "fixture": {
            "checkpoint": "digits.ckpt",
            "train_dir": "train",
            "test_dir": "test",
            "input_size": INPUT_SIZE,
            "variant": VARIANT,
            "eager_top1": top1,
            "num_train": num_train,
            "num_test": num_test,
        },
        "recipe": {
            "data": "sklearn.datasets.load_digits, stratified split "
                    f"(train_test_split, test_size={NUM_TEST}, random_state={SEED})",
            "images": f"{IMAGE_SIZE}x{IMAGE_SIZE} RGB PNG, 8x8 upscaled with {UPSCALE.name.lower()}",
            "arch": ARCH.to_dict(),
            "epochs": EPOCHS,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "max_shift": MAX_SHIFT,
            "seed": SEED,
            "steps": steps,
            "train_seconds": round(seconds, 1),
            "torch_threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "scikit-learn": sklearn.__version__, "numpy": np.__version__},
        },
    }


def _write_folders(train_dir: Path, test_dir: Path) -> tuple[int, int]:
    """The digits as class-subfolder PNG folders, split stratified and seeded; file names keep the dataset index."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(index, test_size=NUM_TEST, stratify=digits.target, random_state=SEED)
    for folder, ids in ((train_dir, train_idx), (test_dir, test_idx)):
        for i in ids:
            target = folder / str(int(digits.target[i]))
            target.mkdir(parents=True, exist_ok=True)
            _to_png(digits.images[i]).save(target / f"{int(i):04d}.png")
    return len(train_idx), len(test_idx)


def _to_png(scan: np.ndarray) -> Image.Image:
    """One 8x8 scan (values 0..16) as an upscaled 8-bit RGB image."""
    gray = np.clip(np.rint(scan * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).resize((IMAGE_SIZE, IMAGE_SIZE), UPSCALE).convert("RGB")


def _batches(n: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled full batches; the remainder is dropped so BatchNorm never sees a tiny batch."""
    order = torch.randperm(n, generator=gen)
    for i in range(0, n - BATCH_SIZE + 1, BATCH_SIZE):
        yield order[i : i + BATCH_SIZE]


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to MAX_SHIFT pixels, padding with the border (background) colour."""
    n, _, h, w = x.shape
    padded = F.pad(x, (MAX_SHIFT,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * MAX_SHIFT + 1, (2, n), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def _train(images: np.ndarray, labels: np.ndarray) -> tuple[PartialNet, int]:
    """AdamW with a one-cycle schedule, seeded and deterministic; returns the eval-mode model and step count."""
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(SEED)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        torch.use_deterministic_algorithms(True)
        try:
            model = PartialNet(ARCH)
            init_weights(model, SEED)
            decay = [p for p in model.parameters() if p.ndim > 1]
            no_decay = [p for p in model.parameters() if p.ndim <= 1]
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                     {"params": no_decay, "weight_decay": 0.0}], lr=LR)
            steps = EPOCHS * (len(x) // BATCH_SIZE)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.2)
            model.train()
            for _ in range(EPOCHS):
                for idx in _batches(len(x), gen):
                    loss = F.cross_entropy(model(_shift(x[idx], gen)), y[idx], label_smoothing=0.1)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
    return model.eval(), steps


def _save_checkpoint(model: PartialNet, path: Path, steps: int) -> None:
    """A Lightning-style checkpoint, loadable without pickled code, as the official training writes it."""
    torch.save(
        {
            "state_dict": {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()},
            "hyper_parameters": {
                "model_name": "partialnet",
                "dataset_name": "sklearn_digits",
                "image_size": INPUT_SIZE,
                "test_crop_ratio": 0.9,
                "embed_dim": ARCH.embed_dim,
                "depths": list(ARCH.depths),
                "feature_dim": ARCH.feature_dim,
                "mlp_ratio": ARCH.mlp_ratio,
                "n_div": ARCH.n_div,
                "act_layer": "GELU",
                "use_channel_attn": True,
                "use_spatial_attn": True,
                "patnet_t0": True,
                "seed": SEED,
            },
            "epoch": EPOCHS - 1,
            "global_step": steps,
        },
        path,
    )
