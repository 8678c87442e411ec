"""Image sources for calibration and validation, all read through the one preprocessing contract.

The embedded default is a deterministic set of crops of the two photographs scikit-learn ships
(`sklearn.datasets.load_sample_images`: china.jpg and flower.jpg). It makes `deploy export` work with no data,
and every report names it; it is no substitute for the user's own images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from partialnet.preprocess import preprocess_image
from partialnet.variants import Preprocess

DEFAULT_SOURCE = "embedded default: deterministic crops of scikit-learn's sample photos (china.jpg, flower.jpg)"


@dataclass
class ImageSet:
    """Preprocessed float32 NCHW images, optional labels, and a sentence saying where they came from."""

    images: np.ndarray
    source: str
    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    names: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    user_data: bool = True

    def __len__(self) -> int:
        return len(self.images)


def _sample_photos() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(img) for img in load_sample_images().images]


def default_images(n: int, pp: Preprocess, seed: int = 0) -> ImageSet:
    """`n` deterministic crops (random position, scale and flip, seeded) of the embedded photos."""
    rng = np.random.default_rng(seed)
    photos = _sample_photos()
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = int(min(w, h) * rng.uniform(0.35, 1.0))
        left = int(rng.integers(0, w - side + 1))
        top = int(rng.integers(0, h - side + 1))
        crop = photo.crop((left, top, left + side, top + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(preprocess_image(crop, pp))
    images = np.stack(out).astype(np.float32) if out else np.zeros((0, 3, pp.input_size, pp.input_size), np.float32)
    return ImageSet(images, f"{DEFAULT_SOURCE}, {n} crops, seed {seed}", names=[f"default[{i}]" for i in range(n)],
                    user_data=False)


def _class_dirs(folder: Path) -> list[Path]:
    """Immediate subfolders that hold images (torchvision ImageFolder classes), sorted by name."""
    from partialnet.preprocess import iter_image_files

    return sorted(d for d in folder.iterdir() if d.is_dir() and next(iter(iter_image_files(d)), None) is not None)


def _require_no_empty_class(folder: Path, classes: list[Path]) -> None:
    """A class subfolder without images would silently shift every later label (labels are sorted positions)."""
    from partialnet.errors import UsageError

    every = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    empty = [d.name for d in every if d not in classes]
    if empty:
        names = ", ".join(f"{n}/" for n in empty[:5]) + (", ..." if len(empty) > 5 else "")
        raise UsageError(
            f"{folder}: class subfolder(s) {names} hold no images ({len(every)} subfolders, {len(classes)} with "
            f"images). Labels are subfolder positions in sorted order (as torchvision's ImageFolder), so an empty "
            f"class would shift the label of every class after it; add its images, or remove the folder."
        )


def _sample(groups: list[list[int]], limit: int | None, rng: np.random.Generator) -> list[int]:
    """Seeded sample of at most `limit` indices, round-robin across groups so every class is represented."""
    total = sum(len(g) for g in groups)
    if limit is None or limit >= total:
        return sorted(i for g in groups for i in g)
    shuffled = [list(rng.permutation(g)) for g in groups]
    picked: list[int] = []
    while len(picked) < limit:
        for g in shuffled:
            if g and len(picked) < limit:
                picked.append(int(g.pop()))
    return sorted(picked)


def image_files(path: str | Path) -> tuple[list[Path], list[int] | None, list[str] | None, str]:
    """The image files a data argument names, with labels when it has class subfolders or a labelled list.

    A folder: recursive (jpg, png, webp, bmp); class subfolders become labels in sorted-name order. A text file:
    one image path per line (relative to the file), optionally followed by an integer label.
    """
    from partialnet.errors import UsageError
    from partialnet.preprocess import iter_image_files

    path = Path(path)
    if not path.exists():
        raise UsageError(f"data path {path} does not exist.")
    if path.is_dir():
        classes = _class_dirs(path)
        loose = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp")]
        if classes and not loose:
            _require_no_empty_class(path, classes)
            files, labels = [], []
            for idx, d in enumerate(classes):
                for f in iter_image_files(d):
                    files.append(f)
                    labels.append(idx)
            return files, labels, [d.name for d in classes], f"folder {path} ({len(classes)} class subfolders)"
        return list(iter_image_files(path)), None, None, f"folder {path}"
    if path.suffix.lower() == ".txt":
        files, labels = [], []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.strip().rsplit(maxsplit=1)
            if not parts or line.strip().startswith("#"):
                continue
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                files.append((path.parent / parts[0]).resolve())
                labels.append(int(parts[1]))
            else:
                files.append((path.parent / line.strip()).resolve())
        if labels and len(labels) != len(files):
            raise UsageError(f"{path}: some lines have a label and some do not; label every line or none.")
        return files, labels or None, None, f"list {path}"
    raise UsageError(f"data path {path} must be a folder of images, a .txt list of image paths, or a .npy array.")


def load_images(path: str | Path, pp: Preprocess, *, limit: int | None = None, seed: int = 0,
                progress=None) -> ImageSet:
    """Read, sample (seeded, stratified by class) and preprocess images; unreadable ones are skipped and counted."""
    from partialnet.errors import DeployError, ImageError, UsageError
    from partialnet.preprocess import load_image

    path = Path(path)
    if path.suffix.lower() == ".npy":
        from partialnet.arrays import read_npy, require_finite

        if not path.exists():
            raise UsageError(f"data path {path} does not exist.")
        arr = read_npy(path, f"data array {path}")
        if arr.dtype != np.float32 or arr.ndim != 4 or arr.shape[1:] != (3, pp.input_size, pp.input_size):
            raise UsageError(
                f"{path} holds {arr.dtype} {list(arr.shape)}; expected preprocessed float32 "
                f"[N, 3, {pp.input_size}, {pp.input_size}]."
            )
        require_finite(arr, f"data array {path}", "Preprocess the images again, or drop those rows.")
        idx = _sample([list(range(len(arr)))], limit, np.random.default_rng(seed))
        return ImageSet(arr[idx], f"array {path} ({len(idx)} of {len(arr)} rows)", names=[f"{path.name}[{i}]" for i in idx])
    files, labels, class_names, what = image_files(path)
    if labels is not None:
        groups: dict[int, list[int]] = {}
        for i, lab in enumerate(labels):
            groups.setdefault(lab, []).append(i)
        chosen = _sample(list(groups.values()), limit, np.random.default_rng(seed))
    else:
        chosen = _sample([list(range(len(files)))], limit, np.random.default_rng(seed))
    images, kept_labels, names, skipped = [], [], [], []
    iterator = progress(chosen) if progress else chosen
    for i in iterator:
        try:
            images.append(preprocess_image(load_image(files[i]), pp))
        except ImageError as e:
            skipped.append(str(e))
            continue
        names.append(str(files[i]))
        if labels is not None:
            kept_labels.append(labels[i])
    if not images:
        detail = f" ({len(skipped)} unreadable)" if skipped else ""
        raise DeployError(f"no readable images in {path}{detail}; expected jpg, png, webp or bmp files.")
    return ImageSet(
        np.stack(images).astype(np.float32),
        f"{what}: {len(images)} images" + (f" sampled from {len(files)}" if len(chosen) < len(files) else ""),
        labels=np.asarray(kept_labels, np.int64) if labels is not None else None,
        class_names=class_names,
        names=names,
        skipped=skipped,
    )
