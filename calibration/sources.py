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


def image_files(path: str | Path, *, labels_file: str | Path | None = None, class_index: str | Path | None = None
                ) -> tuple[list[Path], list[int] | None, list[str] | None, str]:
    """The image files a data argument names, with labels when it has class subfolders or a labelled list.

    A folder: recursive (jpg, png, webp, bmp); class subfolders become labels in sorted-name order (or, with
    `class_index`, the index it gives each subfolder's name). A flat folder with `labels_file` (ImageNet's
    validation layout): labels from Kaggle's `ImageId,PredictionString` CSV or a `name label` list. A text file:
    one image path per line (relative to the file), optionally followed by a label.
    """
    from partialnet.errors import UsageError
    from partialnet.preprocess import iter_image_files

    from .layouts import read_class_index, read_ground_truth

    path = Path(path)
    if not path.exists():
        raise UsageError(f"data path {path} does not exist.")
    index = read_class_index(class_index) if class_index is not None else None
    if labels_file is not None:
        if not path.is_dir():
            raise UsageError(f"--labels applies to a flat folder of images (ImageNet's validation layout); {path} "
                             f"is not a folder.")
        files = list(iter_image_files(path))
        labels = read_ground_truth(labels_file, files, index)
        return files, labels, None, f"folder {path} (labels from {Path(labels_file).name})"
    if path.is_dir():
        classes = _class_dirs(path)
        loose = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp")]
        if classes and not loose:
            _require_no_empty_class(path, classes)
            files, labels = [], []
            ids = [lookup_class(index, d.name, f"{path}: subfolder {d.name}/") if index else i
                   for i, d in enumerate(classes)]
            for idx, d in zip(ids, classes):
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
            elif len(parts) == 2 and index is not None and parts[1] in index:
                files.append((path.parent / parts[0]).resolve())
                labels.append(index[parts[1]])
            else:
                files.append((path.parent / line.strip()).resolve())
        if labels and len(labels) != len(files):
            raise UsageError(f"{path}: some lines have a label and some do not; label every line or none.")
        return files, labels or None, None, f"list {path}"
    raise UsageError(f"data path {path} must be a folder of images, a .txt list of image paths, or a .npy array.")


def lookup_class(index: dict[str, int], name: str, where: str) -> int:
    from partialnet.errors import UsageError

    if name not in index:
        raise UsageError(f"{where} names class {name!r}, which the --class-index file does not list "
                         f"({len(index)} classes, e.g. {', '.join(list(index)[:3])}).")
    return index[name]


@dataclass
class ImageList:
    """The files a data argument names, sampled (seeded, stratified by class), with their labels: what streaming
    validation decodes batch by batch."""

    files: list[Path]
    labels: list[int] | None
    class_names: list[str] | None
    what: str  # "folder X (10 class subfolders)"
    total: int  # files before sampling

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, kept: int) -> str:
        """The data source sentence of a report, once `kept` images were read."""
        return f"{self.what}: {kept} images" + (f" sampled from {self.total}" if len(self.files) < self.total else "")


def list_images(path: str | Path, *, limit: int | None = None, seed: int = 0, labels_file: str | Path | None = None,
                class_index: str | Path | None = None) -> ImageList:
    """The files of a folder or list, sampled to `limit` with `seed` (round-robin over classes), in listing order."""
    files, labels, class_names, what = image_files(path, labels_file=labels_file, class_index=class_index)
    if labels is not None:
        groups: dict[int, list[int]] = {}
        for i, lab in enumerate(labels):
            groups.setdefault(lab, []).append(i)
        chosen = _sample(list(groups.values()), limit, np.random.default_rng(seed))
    else:
        chosen = _sample([list(range(len(files)))], limit, np.random.default_rng(seed))
    return ImageList([files[i] for i in chosen], [labels[i] for i in chosen] if labels is not None else None,
                     class_names, what, len(files))


def read_array(path: str | Path, pp: Preprocess, *, mmap: bool = False) -> np.ndarray:
    """A preprocessed float32 NCHW .npy, checked (dtype, shape, every value finite, in chunks when memory-mapped)."""
    from partialnet.arrays import read_npy, require_finite
    from partialnet.errors import UsageError

    path = Path(path)
    if not path.exists():
        raise UsageError(f"data path {path} does not exist.")
    arr = read_npy(path, f"data array {path}", mmap=mmap)
    if arr.dtype != np.float32 or arr.ndim != 4 or arr.shape[1:] != (3, pp.input_size, pp.input_size):
        raise UsageError(
            f"{path} holds {arr.dtype} {list(arr.shape)}; expected preprocessed float32 "
            f"[N, 3, {pp.input_size}, {pp.input_size}]."
        )
    require_finite(arr, f"data array {path}", "Preprocess the images again, or drop those rows.")
    return arr


def sample_rows(n: int, limit: int | None, seed: int) -> list[int]:
    """The rows of an unlabelled array that `limit` and `seed` pick, as load_images picks them."""
    return _sample([list(range(n))], limit, np.random.default_rng(seed))


def load_images(path: str | Path, pp: Preprocess, *, limit: int | None = None, seed: int = 0,
                progress=None) -> ImageSet:
    """Read, sample (seeded, stratified by class) and preprocess images; unreadable ones are skipped and counted."""
    from partialnet.errors import DeployError, ImageError
    from partialnet.preprocess import load_image

    path = Path(path)
    if path.suffix.lower() == ".npy":
        arr = read_array(path, pp)
        idx = sample_rows(len(arr), limit, seed)
        return ImageSet(arr[idx], f"array {path} ({len(idx)} of {len(arr)} rows)", names=[f"{path.name}[{i}]" for i in idx])
    listed = list_images(path, limit=limit, seed=seed)
    images, kept_labels, names, skipped = [], [], [], []
    iterator = progress(range(len(listed))) if progress else range(len(listed))
    for i in iterator:
        try:
            images.append(preprocess_image(load_image(listed.files[i]), pp))
        except ImageError as e:
            skipped.append(str(e))
            continue
        names.append(str(listed.files[i]))
        if listed.labels is not None:
            kept_labels.append(listed.labels[i])
    if not images:
        detail = f" ({len(skipped)} unreadable)" if skipped else ""
        raise DeployError(f"no readable images in {path}{detail}; expected jpg, png, webp or bmp files.")
    return ImageSet(
        np.stack(images).astype(np.float32),
        listed.describe(len(images)),
        labels=np.asarray(kept_labels, np.int64) if listed.labels is not None else None,
        class_names=listed.class_names,
        names=names,
        skipped=skipped,
    )
