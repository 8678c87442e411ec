"""The ground-truth files of ImageNet's flat validation folder, and the synset-to-index files that go with them.

Ground truth (`--labels`): Kaggle's `LOC_val_solution.csv` (`ImageId,PredictionString`, the first word of the
prediction string is the synset) or a `val.txt` of `name label` lines (label an index or a synset). Class index
(`--class-index`): a JSON object (Keras' `{"0": ["n01440764", "tench"], ...}` or `{"n01440764": 0, ...}`), or a text
file of `synset index` lines, or one synset per line in index order (as `LOC_synset_mapping.txt`).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

from partialnet.errors import UsageError


def read_class_index(path: str | Path) -> dict[str, int]:
    """Class name (synset) -> index."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--class-index {path} does not exist." if not path.exists() else
                         f"--class-index {path} is a folder; name a JSON or text file mapping synsets to indices.")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--class-index {path} is not valid JSON ({e}).") from e
        if not isinstance(obj, dict) or not obj:
            raise UsageError(f"--class-index {path} must hold a JSON object mapping synsets to indices.")
        out: dict[str, int] = {}
        for k, v in obj.items():
            if isinstance(v, list) and v and str(k).isdigit():  # Keras: {"0": ["n01440764", "tench"]}
                out[str(v[0])] = int(k)
            elif isinstance(v, int):
                out[str(k)] = v
            else:
                raise UsageError(f"--class-index {path}: entry {k!r}: {v!r} is neither 'synset: index' nor "
                                 f"'index: [synset, name]'.")
        return out
    lines = [ln.split() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if lines and all(len(p) == 2 and p[1].isdigit() for p in lines):
        return {p[0]: int(p[1]) for p in lines}
    return {p[0]: i for i, p in enumerate(lines)}


def _label(token: str, index: dict[str, int] | None, where: str) -> int:
    if token.lstrip("-").isdigit():
        return int(token)
    if index is None:
        raise UsageError(f"{where}: the label {token!r} is a class name; pass --class-index FILE mapping names "
                         f"(synsets) to indices.")
    if token not in index:
        raise UsageError(f"{where}: class {token!r} is not in the --class-index file ({len(index)} classes).")
    return index[token]


def read_ground_truth(path: str | Path, files: Sequence[Path], index: dict[str, int] | None) -> list[int]:
    """The label of every file (matched by name, with or without its extension); a file without one is an error."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--labels {path} does not exist." if not path.exists() else f"--labels {path} is a folder.")
    by_name: dict[str, int] = {}
    with open(path, encoding="utf-8", newline="") as f:
        head = f.readline()
        f.seek(0)
        if head.replace(" ", "").lower().startswith("imageid,predictionstring"):
            reader = csv.reader(f)
            next(reader)
            for n, row in enumerate(reader, 2):
                if not row:
                    continue
                if len(row) < 2 or not row[1].split():
                    raise UsageError(f"{path}:{n}: expected 'ImageId,PredictionString', got {','.join(row)!r}.")
                by_name[row[0].strip()] = _label(row[1].split()[0], index, f"{path}:{n}")
        else:
            for n, line in enumerate(f, 1):
                parts = line.split()
                if not parts or parts[0].startswith("#"):
                    continue
                if len(parts) != 2:
                    raise UsageError(f"{path}:{n}: expected 'name label', got {line.strip()!r}.")
                by_name[parts[0]] = _label(parts[1], index, f"{path}:{n}")
    labels, missing = [], []
    for p in files:
        lab = by_name.get(p.name, by_name.get(p.stem))
        if lab is None:
            missing.append(p.name)
        labels.append(lab)
    if missing:
        raise UsageError(f"--labels {path} has no label for {len(missing)} of the {len(files)} images, e.g. "
                         f"{', '.join(missing[:3])}; it must name every image of the folder.")
    return labels
