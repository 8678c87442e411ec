"""Does `deploy validate` stay bounded at dataset scale? Peak memory, images/s and the share of decoding per size.

For each size (default 2,000, 10,000 and 20,000 images) this script

* writes a synthetic labelled folder (10 class subfolders of JPEGs, --image-size px, deterministic) into a
  temporary folder, deleted afterwards;
* runs `deploy validate DIR --data FOLDER --json` in its own process, once in this process's way (the decoding pool)
  and once with `--cluster local:2`, sampling the resident memory of the command's whole process tree (the command,
  its decoding workers, Dask's scheduler and workers) every 50 ms;
* reads images/s, per-runner images/s and the decoding share from the report's `throughput` section, and checks that
  both runs give the same top-1 for every row.

The export is --export DIR, or a fresh partialnet_t0 at --input-size (FP32 artifacts of every backend) made in the
temporary folder. Markdown goes to --output and stdout, progress to stderr. Example:

    python benchmarks/validate_scale.py --output benchmarks/VALIDATE_SCALE.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.report import cpu_model  # noqa: E402
from partialnet.files import atomic_write_text  # noqa: E402
from runtimes.cpu import usable_cpus, x86_flags  # noqa: E402

DEPLOY = [sys.executable, "-m", "deploy"]
CLASSES = 10


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_folder(root: Path, n: int, size: int) -> Path:
    """n JPEGs in CLASSES subfolders: smooth coloured noise, a different hue per class, seeded."""
    from PIL import Image

    rng = np.random.default_rng(n)
    for i in range(n):
        c = i % CLASSES
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        small[..., c % 3] = np.clip(small[..., c % 3].astype(int) + 25 * c, 0, 255)
        Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR).save(folder / f"{i:06d}.jpg",
                                                                                      quality=90)
    return root


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(argv: list[str]) -> tuple[dict, float, int, int]:
    """(report, seconds, peak RSS of the command alone, peak RSS of its process tree)."""
    start = time.perf_counter()
    # Files, not pipes: a report or progress output larger than a pipe's buffer would block the command while
    # this loop only samples its memory.
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        proc = subprocess.Popen(argv, stdout=out_f, stderr=err_f, text=True)
        ps = psutil.Process(proc.pid)
        peak_self = peak_tree = 0
        while proc.poll() is None:
            try:
                peak_self = max(peak_self, ps.memory_info().rss)
                peak_tree = max(peak_tree, tree_rss(ps))
            except psutil.Error:
                pass
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    if proc.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {err.strip().splitlines()[-1:]}")
    return json.loads(out), seconds, peak_self, peak_tree


def mb(n: int) -> str:
    return f"{n / 2**20:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2000,10000,20000", help="images per folder, comma-separated")
    ap.add_argument("--export", help="an export folder (default: a fresh partialnet_t0 at --input-size)")
    ap.add_argument("--input-size", type=int, default=128, help="input size of the fresh export (default 128)")
    ap.add_argument("--image-size", type=int, default=320, help="JPEG side in px (default 320, as in the issue)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cluster-sizes", default=None,
                    help="sizes also run with --cluster local:2, comma-separated (default: every size; 'none')")
    ap.add_argument("--output", help="write the Markdown here too")
    args = ap.parse_args()
    started = time.perf_counter()
    sizes = [int(s) for s in args.sizes.split(",")]
    on_cluster = sizes if args.cluster_sizes is None else [] if args.cluster_sizes == "none" else \
        [int(s) for s in args.cluster_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="validate-scale-") as tmp:
        tmp_path = Path(tmp)
        export = Path(args.export) if args.export else tmp_path / "export"
        if not args.export:
            log(f"exporting partialnet_t0 at {args.input_size} px into {export}")
            subprocess.run([*DEPLOY, "export", "partialnet_t0", "--input-size", str(args.input_size), "--output",
                            str(export), "-q", "--no-validate", "--no-bench"], check=True)
        rows = []
        for n in sizes:
            data = tmp_path / f"data_{n}"
            log(f"writing {n} JPEGs of {args.image_size} px")
            write_folder(data, n, args.image_size)
            modes = [("one process, decoding pool", [])] + ([("--cluster local:2", ["--cluster", "local:2"])]
                                                           if n in on_cluster else [])
            top1 = {}
            for label, extra in modes:
                log(f"validating {n} images ({label})")
                doc, seconds, peak_self, peak_tree = run([*DEPLOY, "validate", str(export), "--data", str(data),
                                                          "--json", "-q", "--batch-size", str(args.batch_size),
                                                          *extra])
                t = doc["throughput"]
                top1[label] = [a["top1"] for a in doc["artifacts"]]
                rows.append((n, label, seconds, peak_self, peak_tree, t, doc))
            if len(top1) == 2:
                a, b = top1.values()
                if a != b:
                    raise SystemExit(f"top-1 differs between one process {a} and the cluster {b} at {n} images")
            shutil.rmtree(data)
        doc0 = rows[0][6]
        isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in (x86_flags() or ()))
        keys = [a["key"] for a in doc0["artifacts"]]
        lines = [
            "# `deploy validate` at dataset scale", "",
            f"Created {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')} in "
            f"{time.perf_counter() - started:.0f} s by `python benchmarks/validate_scale.py "
            f"{' '.join(sys.argv[1:])}`.", "",
            f"- CPU: {cpu_model()} ({usable_cpus()} cores usable; {isa}), "
            f"shared with other work",
            f"- export: {doc0['export']['variant']} at {doc0['export']['input_size']} px, runners "
            f"{', '.join(keys)}; batch {args.batch_size}",
            f"- data: synthetic labelled folders, {CLASSES} class subfolders of {args.image_size}x{args.image_size} "
            f"JPEGs, written to a temporary folder and deleted after",
            "- peak RSS: resident memory sampled every 50 ms, of the command alone and of its whole process tree "
            "(decoding workers, or Dask's scheduler, nanny and worker processes)", "",
            "| images | mode | seconds | images/s | peak RSS MB (command) | peak RSS MB (tree) | decoding share | "
            + " | ".join(f"{k} images/s" for k in keys) + " |",
            "|---:|---|---:|---:|---:|---:|---:|" + "---:|" * len(keys),
        ]
        for n, label, seconds, peak_self, peak_tree, t, _ in rows:
            per = t["runners_images_per_s"]
            lines.append(f"| {n} | {label} | {seconds:.1f} | {n / seconds:.1f} | {mb(peak_self)} | {mb(peak_tree)} | "
                         f"{t['decode_share']:.0%} | " + " | ".join(f"{per[k]:.0f}" for k in keys) + " |")
        lines += ["", "Seconds and images/s are wall time of the whole command (model loading and, for the cluster, "
                  "starting it included). The decoding share is decoding seconds over decoding plus runner seconds "
                  "(all processes). The per-runner figures are each runner's own compute time. One process and the "
                  "cluster gave the same top-1 for every row at every size run on both.", ""]
        text = "\n".join(lines)
        print(text)
        if args.output:
            atomic_write_text(args.output, text, force=True)


if __name__ == "__main__":
    main()
