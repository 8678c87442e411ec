"""`deploy bench`: interleaved timing, the rows of its JSON, speed-up arithmetic, and the files it writes.

Durations are tiny and nothing asserts how fast anything ran: only the structure and the arithmetic.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

import pytest
from PIL import Image

from deploy.bench import Latency, parse_batch_sizes
from deploy.cli import main
from partialnet.errors import UsageError

ROW_KEYS = {"backend", "precision", "batch_size", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput",
            "images_per_s", "speedup_vs_eager", "top1_agreement", "calls", "runner", "threads", "pid", "affinity",
            "streams", "noisy", "settle_ms_median"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def folder(tiny_export) -> Path:
    return tiny_export


@pytest.fixture(scope="module")
def bench(folder) -> tuple[int, dict, str]:
    import contextlib
    import io

    import torch

    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()  # --threads sets torch's process-wide pool; give it back to later tests
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["bench", str(folder), "--json", "--batch-sizes", "1,2", "--warmup-s", "0.05",
                       "--duration-s", "0.2", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    return rc, json.loads(out.getvalue()), err.getvalue()


def test_json_rows_cover_eager_and_every_artifact_per_batch_size(bench):
    rc, doc, _ = bench
    assert rc == 0
    keys = [(r["backend"], r["precision"], r["batch_size"]) for r in doc["rows"]]
    assert keys == [(b, "fp32", bs) for bs in (1, 2) for b in ("eager", "onnxruntime", "openvino")]
    for r in doc["rows"]:
        assert ROW_KEYS <= set(r)
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["throughput"] > 0 and r["calls"] >= 5
        assert r["top1_agreement"] == 1.0
    assert all(r["threads"] == 1 for r in doc["rows"] if r["backend"] != "eager")
    assert doc["settings"]["batch_sizes"] == [1, 2] and doc["settings"]["duration_s"] == 0.2
    env = doc["environment"]
    assert {"cpu", "isa", "usable_cpus", "gpu", "libraries", "torch_threads"} <= set(env)
    assert "onnxruntime" in env["libraries"] and "torch" in env["libraries"]


def test_speedup_is_eager_p50_over_artifact_p50(bench):
    _, doc, _ = bench
    for bs in (1, 2):
        rows = [r for r in doc["rows"] if r["batch_size"] == bs]
        eager = next(r for r in rows if r["backend"] == "eager")
        assert eager["speedup_vs_eager"] == 1.0
        for r in rows:
            assert r["speedup_vs_eager"] == pytest.approx(eager["p50_ms"] / r["p50_ms"], rel=1e-12)


def test_files_png_markdown_and_json(bench, folder):
    _, doc, err = bench
    png = folder / "bench.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200
    md = (folder / "bench.md").read_text()
    assert "| backend | precision | batch | p50 ms |" in md
    assert "![latency or throughput against top-1 agreement](bench.png)" in md
    assert sum(bool(re.match(r"\| (eager|onnxruntime|openvino) \| fp32 \| [12] \|", line)) for line in md.splitlines()) == 6
    runner_rows = [line for line in md.splitlines() if re.match(r"\| (eager|onnxruntime/fp32|openvino/fp32) \| \d+ \|", line)]
    assert len(runner_rows) == 3  # one per runner: its process, threads, CPUs, hint, settle
    assert json.loads((folder / "bench.json").read_text()) == doc
    assert f"wrote {folder / 'bench.json'}" in err


def test_a_changed_prediction_is_reported_with_its_margin(folder, capsys, monkeypatch):
    """An artifact that swaps eager's top two classes on every image: agreement 0, and a note per artifact (not per
    batch size) giving the largest eager margin among the changed images."""
    import numpy as np

    from runtimes.ov import OpenVINORunner

    original = OpenVINORunner.run

    def swap_top_two(self, feeds):
        out = {}
        for k, v in original(self, feeds).items():
            v = v.copy()
            order = np.argsort(-v, axis=1)
            rows = np.arange(len(v))
            v[rows, order[:, 0]], v[rows, order[:, 1]] = v[rows, order[:, 1]], v[rows, order[:, 0]].copy()
            out[k] = v
        return out

    monkeypatch.setattr(OpenVINORunner, "run", swap_top_two)
    rc = main(["bench", str(folder), "--batch-sizes", "1,2", "--warmup-s", "0.02", "--duration-s", "0.05",
               "--backends", "openvino", "-q"])
    out = capsys.readouterr().out
    assert rc == 0
    notes = [ln for ln in out.splitlines() if ln.startswith("openvino fp32: top-1 changed on 16 of 16 images")]
    assert len(notes) == 1 and "whose eager top-1 margin is at most" in notes[0]
    doc = json.loads((folder / "bench.json").read_text())
    [row] = [r for r in doc["rows"] if r["backend"] == "openvino" and r["batch_size"] == 1]
    assert row["top1_agreement"] == 0.0 and 0 < row["flipped_margin_max"] and row["ref_margin_median"] > 0


def _workers(tmp_path, **runners):
    """One worker process per named LoggingRunner (see tests/helpers.py), each logging to its own file."""
    from functools import partial

    from deploy.backends import RunnerOptions
    from deploy.timing import WorkerSpec, open_workers, send_inputs
    from helpers import LoggingRunner

    specs = [WorkerSpec(name, RunnerOptions(), factory=partial(LoggingRunner, str(tmp_path / f"{name}.log"), **kw))
             for name, kw in runners.items()]
    workers = open_workers(specs)
    send_inputs(workers, {1: np.zeros((1, 3, 4, 4), np.float32)})
    return workers


def test_every_runner_times_in_its_own_process_and_only_one_computes_at_a_time(tmp_path):
    from deploy.timing import close_workers, round_robin
    from helpers import read_intervals

    workers = _workers(tmp_path, a={}, b={"call_s": 0.004}, c={})
    try:
        timed = round_robin(workers, [1], mode="latency", warmup_s=0.02, duration_s=0.1, slice_s=0.03, min_calls=3)
        pids = {w.info.pid for w in workers}
    finally:
        close_workers(workers)
    assert len(pids) == 3 and os.getpid() not in pids
    calls = sorted((iv, name) for name in "abc" for iv in read_intervals(tmp_path / f"{name}.log")["call"])
    for (first, who), (second, other) in zip(calls, calls[1:]):
        assert first[1] <= second[0] or who == other, (who, other)  # no two workers' calls overlap
    # Round-robin: the timed slices of the three workers interleave, each round starting with the next worker.
    slices = sorted((s, k[0]) for k, t in timed.items() for s in t.slices)
    order = "".join(k for _, k in slices)
    assert order[:3] in ("abc", "bca", "cab") and set(order[3:6]) == set("abc")
    assert all(len(t.times_s) >= 3 and sum(t.times_s) >= 0.1 for t in timed.values())


@pytest.mark.parametrize("settle", [True, False])
def test_a_pool_that_spins_after_its_turn_does_not_run_into_the_next(tmp_path, settle):
    """A runner leaves a thread spinning 80 ms after every call. With the method's settle (the worker answers only
    once its process is quiet) no other worker computes while it spins; without it (the control), they overlap."""
    from deploy.timing import close_workers, round_robin
    from helpers import read_intervals

    workers = _workers(tmp_path, busy={"spin_after_s": 0.08}, probe={})
    try:
        if not settle:
            for w in workers:
                w.ask("settle", 0.0)
        round_robin(workers, [1], mode="latency", warmup_s=0.01, duration_s=0.05, slice_s=0.01, min_calls=2)
    finally:
        close_workers(workers)
    spins = read_intervals(tmp_path / "busy.log")["spin"]
    probe = read_intervals(tmp_path / "probe.log")["call"]
    overlapping = [c for c in probe if any(s0 < c[1] and c[0] < s1 for s0, s1 in spins)]
    if settle:
        assert spins and overlapping == []
    else:
        assert overlapping  # the control: the test can see the interference it guards against


def test_latency_summary_arithmetic():
    lat = Latency((0.004, 0.001, 0.003, 0.002))
    s = lat.summary(batch_size=2)
    assert s["p50_ms"] == pytest.approx(2.5) and s["mean_ms"] == pytest.approx(2.5) and s["calls"] == 4
    assert s["throughput"] == pytest.approx(2 * 4 / 0.010)
    assert s["p99_ms"] == pytest.approx(3.97)
    ticks = iter(range(100))
    measured = Latency.measure(lambda: None, warmup=2, iters=3, clock=lambda: float(next(ticks)))
    assert measured.times_s == (1.0, 1.0, 1.0)


def test_batch_sizes_parse_and_bad_values_are_usage_errors(folder, capsys):
    assert parse_batch_sizes("1,8") == (1, 8) and parse_batch_sizes(" 4, 4,2 ") == (4, 2)
    for bad in ("0", "1,x", "", "-1"):
        with pytest.raises(UsageError, match="--batch-sizes takes positive integers"):
            parse_batch_sizes(bad)
    rc = main(["bench", str(folder), "--batch-sizes", "1,0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("deploy: error: --batch-sizes") and err.count("\n") == 1
    rc = main(["bench", str(folder), "--duration-s", "0"])
    assert rc == 2 and "expected a number > 0" in capsys.readouterr().err
