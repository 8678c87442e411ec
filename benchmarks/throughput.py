"""Throughput of an export folder's OpenVINO artifacts: `deploy bench --mode throughput` against OpenVINO's own
`benchmark_app -hint throughput`, and the latency mode at batch 8 against `benchmark_app -hint latency -b 8`.

For each export folder, in fresh processes, alternating: `benchmark_app` on every OpenVINO IR (f32 inference
precision, the given threads), then `deploy bench D --mode throughput --batch-sizes 1,8` and `deploy bench D
--batch-sizes 8`. The table gives images/s (throughput) or p50 ms (batch 8) from each and their ratio, with eager's
figures for the speed-up.

    python benchmarks/throughput.py D_t0 D_t2 --threads 2 > benchmarks/THROUGHPUT.md
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def benchmark_app(xml: Path, hint: str, batch: int, seconds: int) -> dict[str, float]:
    """benchmark_app's own figures. It takes no thread count with a hint (its rule): it uses every usable core."""
    out = subprocess.run([str(BIN / "benchmark_app"), "-m", str(xml), "-d", "CPU", "-hint", hint, "-b", str(batch),
                          "-infer_precision", "f32", "-t", str(seconds)],
                         capture_output=True, text=True, check=True).stdout
    fps = float(re.search(r"Throughput:\s+([\d.]+) FPS", out).group(1))
    median = float(re.search(r"Median:\s+([\d.]+) ms", out).group(1))
    return {"images_per_s": fps, "p50_ms": median}


def deploy_bench(folder: Path, mode: str, batches: str, threads: int, seconds: float) -> dict[tuple[str, int], dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([str(BIN / "deploy"), "bench", str(folder), "--mode", mode, "--batch-sizes", batches,
                              "--threads", str(threads), "--duration-s", str(seconds), "--json", "--quiet"],
                             capture_output=True, text=True, check=True, cwd=tmp).stdout
    doc = json.loads(out)
    return {(r["key"], r["batch_size"] if "batch_size" in r else r.get("batch")): r for r in doc["rows"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=2, help="deploy bench's threads: use the machine's core count, "
                                                          "which benchmark_app uses under a hint")
    ap.add_argument("--seconds", type=int, default=10)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from deploy.report import isa_summary, machine_fingerprint

    env = machine_fingerprint()
    print(f"# Throughput against benchmark_app ({env['cpu']}: {isa_summary(env)}; {args.threads} threads)\n")
    print(f"`python benchmarks/throughput.py {' '.join(str(f) for f in args.folders)} --threads {args.threads} "
          f"--seconds {args.seconds}`\n")
    print("| export | IR | measure | benchmark_app | deploy bench | deploy bench / benchmark_app | deploy bench vs eager |")
    print("|---|---|---|---:|---:|---:|---:|")
    for folder in args.folders:
        manifest = json.loads((folder / "manifest.json").read_text())
        irs = [(a["precision"], folder / a["path"]) for a in manifest["artifacts"] if a["backend"] == "openvino"]
        print(f"benchmarking {folder}", file=sys.stderr)
        ref = {(p, m): benchmark_app(xml, *m, args.seconds)
               for p, xml in irs for m in (("throughput", 1), ("throughput", 8), ("latency", 8))}
        thr = deploy_bench(folder, "throughput", "1,8", args.threads, args.seconds)
        lat = deploy_bench(folder, "latency", "8", args.threads, args.seconds)
        for precision, xml in irs:
            key = f"openvino/{precision}"
            for (hint, batch), table, field, unit in (
                    (("throughput", 1), thr, "images_per_s", "images/s"),
                    (("throughput", 8), thr, "images_per_s", "images/s"),
                    (("latency", 8), lat, "p50_ms", "p50 ms")):
                row, eager = table.get((key, batch)), table.get(("eager", batch))
                if row is None:
                    continue
                got, want = row[field], ref[(precision, (hint, batch))][field]
                vs_eager = (got / eager[field] if field == "images_per_s" else eager[field] / got) if eager else None
                print(f"| {folder.name} | {xml.name} | {hint} batch {batch} ({unit}) | {want:.2f} | {got:.2f} "
                      f"| {got / want:.2f} | {'' if vs_eager is None else f'{vs_eager:.2f}x'} |")


if __name__ == "__main__":
    main()
