"""`deploy bench`: interleaved timing, the rows of its JSON, speed-up arithmetic, and the files it writes.

Durations are tiny and nothing asserts how fast anything ran: only the structure and the arithmetic.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from deploy.bench import Latency, measure_interleaved, parse_batch_sizes
from deploy.cli import main
from partialnet.errors import UsageError

ROW_KEYS = {"backend", "precision", "batch_size", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput",
            "speedup_vs_eager", "top1_agreement", "calls", "runner", "threads"}
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
    assert "![p50 latency against top-1 agreement](bench.png)" in md
    assert sum(line.startswith(("| eager |", "| onnxruntime |", "| openvino |")) for line in md.splitlines()) == 6
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


def test_runs_are_interleaved_in_slices_and_warmup_is_discarded():
    now = [0.0]
    order: list[str] = []

    def clock() -> float:
        return now[0]

    def work(name: str, cost: float):
        def fn():
            order.append(name)
            now[0] += cost
        return fn

    lat = measure_interleaved({"a": work("a", 0.04), "b": work("b", 0.25)}, warmup_s=0.1, duration_s=0.5,
                              slice_s=0.1, min_calls=2, clock=clock)
    # Warm-up: one round covers 0.1 s of each. Then timed rounds, each starting with the next function in turn; a
    # takes three calls to fill a 0.1 s slice, b one; both keep taking turns until both have 0.5 s.
    assert "".join(order[:4]) == "aaab"
    assert "".join(order[4:]) == "aaab" "baaa" "aaab" "baaa" "aaab"
    assert lat["a"].times_s == pytest.approx((0.04,) * 15) and lat["b"].times_s == pytest.approx((0.25,) * 5)


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
