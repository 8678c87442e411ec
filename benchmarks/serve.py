"""What does serving cost? `deploy serve` throughput and latency at several client concurrencies, beside `deploy bench`.

For one export folder and artifact, this script

* runs `deploy bench DIR --backends B` (its own process: the artifact interleaved with eager) for the in-process
  figures at batch 1 and 8, before and again after the serving runs: the cores are shared with other work, and the
  two runs show how much the load moved meanwhile (comparisons use the faster of the two, the least disturbed);
* starts `deploy serve DIR --backend B --precision P` on free loopback ports and waits until both models are ready;
* runs `deploy loadtest http://127.0.0.1:PORT --verify DIR` (its own process) at each concurrency, batch 1, so every
  answer is also checked against the local runner, then the image model (encoded JPEG bytes) at one concurrency;
* stops the server with SIGTERM (by its process id) and writes a Markdown table.

Client and server share this machine's cores, as a load test on one box does: the figures are an upper bound on
what the HTTP path costs, not a measurement of a remote client. Markdown goes to --output and stdout, progress to
stderr. Example (the issue's artifact: T0, 128 px, OpenVINO INT8):

    deploy export partialnet_t0 --int8 --input-size 128 --output /tmp/t0_128
    python benchmarks/serve.py /tmp/t0_128 --backend openvino --precision int8 --output benchmarks/SERVE.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.report import cpu_model  # noqa: E402
from export.manifest import Manifest  # noqa: E402
from partialnet.files import atomic_write_text  # noqa: E402
from runtimes.cpu import x86_flags  # noqa: E402

DEPLOY = [sys.executable, "-m", "deploy"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            if s.getsockname()[1] not in ports:
                ports.append(s.getsockname()[1])
    return ports


def run_json(cmd: list[str], timeout: float) -> dict:
    log("$ " + " ".join(cmd[2:] if cmd[:2] == DEPLOY[:2] else cmd))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if out.returncode not in (0, 1) or not out.stdout.strip().startswith("{"):
        raise SystemExit(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)


def bench_rows(folder: Path, backend: str, precision: str, threads: int, duration_s: float) -> dict[int, dict]:
    doc = run_json([*DEPLOY, "bench", str(folder), "--backends", backend, "--batch-sizes", "1,8", "--threads",
                    str(threads), "--duration-s", str(duration_s), "--json", "-q"], timeout=1800)
    rows = {}
    for r in doc["rows"]:
        if r["backend"] == backend and r["precision"] == precision:
            rows[int(r["batch_size"])] = r
    if not rows:
        raise SystemExit(f"deploy bench has no {backend} {precision} row: {[(r['backend'], r['precision']) for r in doc['rows']]}")
    return rows


def start_server(folder: Path, backend: str, precision: str, threads: int, err_path: Path):
    port, grpc, metrics = free_ports(3)
    cmd = [*DEPLOY, "serve", str(folder), "--backend", backend, "--precision", precision, "--threads", str(threads),
           "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    log("$ " + " ".join(cmd[2:]))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(err_path, "w"), stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=ROOT)
    name = Manifest.load(folder).variant
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"deploy serve exited {proc.returncode}: {err_path.read_text()[-500:]}")
        try:
            ok = all(urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{m}/ready", timeout=2).status == 200
                     for m in (name, name + "_image"))
            if ok:
                return proc, port
        except OSError:
            pass
        time.sleep(0.25)
    stop_server(proc)
    raise SystemExit("deploy serve was not ready within 120 s")


def stop_server(proc) -> int:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="export folder made by 'deploy export'")
    ap.add_argument("--backend", default="openvino")
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--concurrency", default="1,4,16", help="client threads to test, comma-separated (default 1,4,16)")
    ap.add_argument("--requests", type=int, default=1000, help="requests per concurrency (default 1000)")
    ap.add_argument("--image-concurrency", type=int, default=4, help="concurrency of the image-model row (0: none)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of the runner, in bench and serve (default 2)")
    ap.add_argument("--bench-duration-s", type=float, default=5.0)
    ap.add_argument("--output", type=Path, default=None, help="write the Markdown here too")
    args = ap.parse_args()

    t_start = time.time()
    manifest = Manifest.load(args.folder)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    log(f"deploy bench {args.folder} ({args.backend} {args.precision}, {args.threads} threads)")
    bench_before = bench_rows(args.folder, args.backend, args.precision, args.threads, args.bench_duration_s)

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    x = np.random.default_rng(0).standard_normal((64, 3, manifest.input_size, manifest.input_size)).astype(np.float32)
    np.save(work / "x.npy", x)
    photos = work / "photos"
    photos.mkdir()
    from PIL import Image
    from sklearn.datasets import load_sample_images

    for i, arr in enumerate(load_sample_images().images):
        img = Image.fromarray(arr)
        img.save(photos / f"photo{i}.jpg", quality=90)  # 640x427, as a camera-sized upload would be decoded here

    proc, port = start_server(args.folder, args.backend, args.precision, args.threads, work / "serve.err")
    url = f"http://127.0.0.1:{port}"
    verify = ["--verify", str(args.folder), "--backend", args.backend, "--precision", args.precision]
    runs = []
    try:
        for c in levels:
            # A short untimed pass first: the batcher's and the runner's first calls are not steady state.
            run_json([*DEPLOY, "loadtest", url, "--data", str(work / "x.npy"), "--concurrency", str(c), "--requests",
                      str(max(2 * c, 20)), "--json", "-q", *verify], timeout=600)
            doc = run_json([*DEPLOY, "loadtest", url, "--data", str(work / "x.npy"), "--concurrency", str(c),
                            "--requests", str(args.requests), "--json", "-q", *verify], timeout=1800)
            runs.append(("tensor", c, doc))
        if args.image_concurrency:
            c = args.image_concurrency
            doc = run_json([*DEPLOY, "loadtest", url, "--data", str(photos), "--concurrency", str(c), "--requests",
                            str(max(args.requests // 4, 50)), "--json", "-q", *verify], timeout=1800)
            runs.append(("image", c, doc))
    finally:
        rc = stop_server(proc)
    log(f"deploy serve exited {rc} after SIGTERM")
    bench_after = bench_rows(args.folder, args.backend, args.precision, args.threads, args.bench_duration_s)

    md = render(args, manifest, {"before": bench_before, "after": bench_after}, runs, rc, time.time() - t_start)
    print(md)
    if args.output:
        atomic_write_text(args.output, md, force=True)
        log(f"wrote {args.output}")
    return 0


def render(args, manifest, benches: dict[str, dict[int, dict]], runs, rc: int, elapsed: float) -> str:
    from importlib import metadata

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "-"

    flags = x86_flags() or frozenset()
    isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags) or "?"
    # The least disturbed in-process figure at batch 1: the faster of the runs before and after serving.
    b1 = min((b[1] for b in benches.values() if 1 in b), key=lambda r: r["p50_ms"], default=None)
    lines = [
        "# What serving costs: `deploy serve` against `deploy bench`",
        "",
        f"Created {dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()} in {elapsed:.0f} s by "
        f"`python benchmarks/serve.py {args.folder} --backend {args.backend} --precision {args.precision} "
        f"--threads {args.threads} --requests {args.requests}`.",
        "",
        f"- CPU: {cpu_model()} ({os.cpu_count()} cores visible; {isa}); client, server and runner share them",
        f"- artifact: {manifest.variant} at {manifest.input_size} px, {args.backend} {args.precision}, "
        f"{manifest.num_classes} classes; runner threads {args.threads} in both bench and serve",
        f"- versions: nvidia-pytriton {version('nvidia-pytriton')} (tritonserver 2.51.0), tritonclient "
        f"{version('tritonclient')}, openvino {version('openvino')}, onnxruntime {version('onnxruntime')}, "
        f"numpy {version('numpy')}",
        "- serve: one model instance, dynamic batching (max batch 8, 500 us queue delay); loadtest sends batch-1 "
        "requests over KServe v2 HTTP (binary tensors), each answer checked against the local runner (--verify)",
        "",
        "## deploy bench (the artifact in-process, no server)",
        "",
        "| run | batch | p50 ms | p90 ms | p99 ms | images/s |",
        "|---|---|---|---|---|---|",
    ]
    for when, bench in benches.items():
        for b, r in sorted(bench.items()):
            lines.append(f"| {when} serving | {b} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | "
                         f"{r['throughput']:.1f} |")
    lines += [
        "",
        "## deploy serve + deploy loadtest",
        "",
        "| model | concurrency | requests | errors | requests/s | p50 ms | p90 ms | p99 ms | requests/s vs bench batch-1 "
        "images/s | p50 minus bench batch-1 p50 | max abs Δlogit vs local |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, c, doc in runs:
        lat = doc["latency_ms"] or {}
        rps = doc["requests_per_s"] or 0.0
        v = doc.get("verify") or {}
        tput = f"{rps / b1['throughput']:.2f}x" if b1 else "-"
        p50 = f"{lat['p50'] - b1['p50_ms']:+.2f} ms" if b1 and lat else "-"
        model = doc["model"] + (" (JPEG bytes, decoded in the server)" if kind == "image" else "")
        lines.append(f"| {model} | {c} | {doc['requests']} | {doc['failed']} | {rps:.1f} | {lat.get('p50', 0):.2f} | "
                     f"{lat.get('p90', 0):.2f} | {lat.get('p99', 0):.2f} | {tput} | {p50} | "
                     f"{v.get('max_abs_logit_diff')} |")
    lines += ["", f"`deploy serve` exited {rc} after SIGTERM.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
