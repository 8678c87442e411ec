"""`deploy validate` at dataset scale (issue 13): streamed sums equal the in-memory figures, exact in any order;
resume, the logits on disk, ImageNet's flat layout, unreadable images, and the Dask cluster on loopback."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from deploy.cli import main
from helpers import noise_class_folders
from runtimes.sums import DriftSums, ExactSum, kth_smallest, median

SYNSETS = ("n01440764", "n01443537", "n01484850")


@pytest.fixture(scope="module")
def folder(tiny_export):
    return tiny_export


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Three class subfolders of 7 noise PNGs each: 21 images, so batches of 4 leave a short last one."""
    return noise_class_folders(tmp_path_factory.mktemp("scale"), ("ants", "bees", "cats"), 7, seed=3, shape=(70, 84))


def validate(capsys, folder, *extra) -> tuple[int, dict, str]:
    rc = main(["validate", str(folder), "--json", *[str(e) for e in extra]])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out else {}), err


def results(doc: dict) -> dict:
    """What must not depend on how the run was split: every row's figures, the decomposition, the data."""
    return {"artifacts": doc["artifacts"], "decomposition": doc["decomposition"], "data": doc["data"],
            "noise_floor": doc["settings"]["noise_floor"]}


# --------------------------------------------------------------------------- sums


def test_exact_sums_and_order_statistics_do_not_depend_on_the_order():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=500) * 10.0 ** rng.integers(-30, 30, 500), [0.0, -0.0, 5e-324, -1e300]])
    assert ExactSum().add(x).value() == math.fsum(x)
    parts = np.array_split(rng.permutation(x), 7)
    total = ExactSum()
    for p in parts[::-1]:
        total.merge(ExactSum().add(p))
    assert total.units == ExactSum().add(x).units
    chunks = lambda: iter(np.array_split(x, 5))  # noqa: E731
    for k in (0, 1, 250, len(x) - 1):
        assert kth_smallest(chunks, k) == np.partition(x, k)[k]
    assert median(chunks, len(x)) == np.median(x) and median(lambda: iter([x[:-1]]), len(x) - 1) == np.median(x[:-1])


def test_drift_sums_of_shards_in_any_order_are_those_of_the_whole():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(64, 10)).astype(np.float32)
    cand = (ref + rng.normal(scale=1e-3, size=ref.shape)).astype(np.float32)
    cand[5, 2] = np.nan
    whole = DriftSums.of(ref, cand).to_json()
    order = rng.permutation(8)
    total = DriftSums()
    for i in order:
        total.merge(DriftSums.of(ref[i * 8 : i * 8 + 8], cand[i * 8 : i * 8 + 8]))
    assert total.to_json() == whole
    assert (total.samples, total.bad, total.candidate_bad, total.classes) == (64, 1, 1, 10)


# --------------------------------------------------------------------------- the streamed report


def test_the_streamed_report_equals_the_in_memory_figures(folder, labelled, capsys):
    from calibration.sources import load_images
    from deploy.backends import RunnerOptions, open_artifact
    from deploy.opening import open_export
    from export.manifest import Manifest
    from partialnet.variants import Preprocess
    from runtimes.compare import run_all

    rc, doc, err = validate(capsys, folder, "--data", labelled, "--batch-size", "4", "--workers", "2")
    assert rc == 0 and "2 decoding worker(s)" in err
    manifest = Manifest.load(folder)
    images = load_images(labelled, Preprocess.from_dict(manifest.preprocess))  # all in memory, as before
    export = open_export(folder, manifest=manifest)
    runners = {"eager": export.eager_runner(RunnerOptions()).runner,
               "onnxruntime/fp32": open_artifact(folder, manifest, "onnxruntime", "fp32", None)[0]}
    logits = run_all(runners, images.images, 4)
    e, o = logits["eager"].astype(np.float64), logits["onnxruntime/fp32"].astype(np.float64)
    rows = {r["key"]: r for r in doc["artifacts"]}
    assert doc["data"]["samples"] == 21 and doc["data"]["class_counts"][:3] == [7, 7, 7]
    assert rows["eager"]["top1"] == float(np.mean(e.argmax(1) == images.labels))
    ort = rows["onnxruntime/fp32"]
    assert ort["top1"] == float(np.mean(o.argmax(1) == images.labels))
    assert ort["per_class_top1"][:3] == [int(((o.argmax(1) == images.labels) & (images.labels == c)).sum())
                                         for c in range(3)]
    err_ = o - e
    assert ort["max_abs_logit_error"] == np.abs(err_).max()
    assert ort["mean_abs_logit_error"] == pytest.approx(np.abs(err_).mean(), rel=1e-12)
    cos = (e * o).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(o, axis=1))
    assert ort["cosine_similarity"] == pytest.approx(cos.mean(), rel=1e-12)
    margins = np.diff(np.sort(e, axis=1)[:, -2:], axis=1)[:, 0]
    assert ort["ref_margin_median"] == np.median(margins)  # exact order statistics, not an estimate
    mad = 1.4826 * np.median(np.abs(err_ - np.median(err_)))
    assert ort["logit_noise"] == (mad if mad else pytest.approx(np.std(err_), rel=1e-12))
    assert ort["top1_agreement"] == float(np.mean(e.argmax(1) == o.argmax(1)))
    t = doc["throughput"]
    assert t["images"] == 21 and t["batches"] == 6 and set(t["runners_images_per_s"]) == set(rows)


def test_decoding_workers_do_not_change_a_figure(folder, labelled, capsys):
    _, pooled, _ = validate(capsys, folder, "--data", labelled, "--batch-size", "4", "--workers", "2", "-q")
    _, inline, _ = validate(capsys, folder, "--data", labelled, "--batch-size", "4", "--workers", "0", "-q")
    assert results(pooled) == results(inline)


def test_an_unreadable_image_keeps_its_place_in_the_batch(folder, labelled, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(labelled, data)
    (data / "bees" / "3.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "logits"
    rc, doc, err = validate(capsys, folder, "--data", data, "--batch-size", "4", "--save-logits", out)
    assert rc == 0 and doc["data"]["samples"] == 20 and doc["data"]["skipped_images"] == 1
    assert "skipped 1 unreadable image(s)" in err and "3.png" in err
    lines = (out / "files.txt").read_text().splitlines()
    assert len(lines) == 21 and lines[10] == f"{data / 'bees' / '3.png'}\t1\tunreadable"
    eager = np.load(out / "eager.npy")
    assert np.isnan(eager[10]).all() and np.isfinite(np.delete(eager, 10, axis=0)).all()
    # The batch holding it still ran at size 4: the other rows are bit-identical to the run without it.
    _, _, _ = validate(capsys, folder, "--data", labelled, "--batch-size", "4", "--save-logits", tmp_path / "ref",
                       "-q")
    ort, ref = np.load(out / "onnxruntime_fp32.npy"), np.load(tmp_path / "ref" / "onnxruntime_fp32.npy")
    assert np.array_equal(np.delete(ort, 10, axis=0), np.delete(ref, 10, axis=0))


# --------------------------------------------------------------------------- resume and the logits


def test_an_interrupted_run_resumes_to_the_same_numbers(folder, labelled, capsys, monkeypatch):
    from deploy import streaming

    args = ("--data", labelled, "--batch-size", "4", "--workers", "0")
    _, whole, _ = validate(capsys, folder, *args, "-q")
    original, calls = streaming.Measurer.measure, []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(streaming.Measurer, "measure", interrupted)
    rc, doc, err = validate(capsys, folder, *args)
    assert rc == 130 and doc == {} and "interrupted after 2 of 6 batches" in err
    assert not (folder / "validation.json").exists() and (folder / ".validation-state" / "state.json").exists()
    monkeypatch.setattr(streaming.Measurer, "measure", original)
    rc, _, err = validate(capsys, folder, *args[:3], "8", "--resume", "-q")
    assert rc == 2 and "was of other inputs" in err and err.count("\n") == 1
    rc, resumed, err = validate(capsys, folder, *args, "--resume")
    assert rc == 0 and "resuming: 2 of 6 batches were done" in err
    assert resumed["throughput"]["batches"] == 4
    assert results(resumed) == results(whole)
    assert not (folder / ".validation-state").exists()


def test_save_logits_writes_one_npy_per_runner_and_the_file_list(folder, labelled, tmp_path, capsys):
    from calibration.sources import load_images
    from deploy.backends import RunnerOptions
    from deploy.opening import open_export
    from partialnet.variants import Preprocess
    from runtimes.compare import run_all

    out = tmp_path / "out"
    rc, doc, _ = validate(capsys, folder, "--data", labelled, "--save-logits", out, "-q")
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["eager.npy", "files.txt", "onnxruntime_fp32.npy",
                                                     "openvino_fp32.npy"]
    export = open_export(folder)
    images = load_images(labelled, Preprocess.from_dict(export.manifest.preprocess))
    eager = run_all({"e": export.eager_runner(RunnerOptions()).runner}, images.images, 16)["e"]
    saved = np.load(out / "eager.npy", mmap_mode="r")
    assert saved.shape == (21, 10) and np.array_equal(saved, eager)
    assert (out / "files.txt").read_text().splitlines()[0] == f"{images.names[0]}\t0\tok"
    rc, _, err = validate(capsys, folder, "--data", labelled, "--save-logits", out)
    assert rc == 2 and f"--save-logits {out} is not empty" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- layouts


def _flat(tmp_path, n=6):
    flat = tmp_path / "val"
    flat.mkdir()
    rng = np.random.default_rng(5)
    for i in range(1, n + 1):
        Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(flat / f"ILSVRC2012_val_{i:08d}.JPEG")
    return flat


def test_imagenet_flat_folder_with_kaggle_csv_or_val_txt_and_a_class_index(folder, tmp_path, capsys):
    flat = _flat(tmp_path)
    truth = [2, 0, 1, 1, 0, 2]
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{i + 1:08d},{SYNSETS[c]} 1 2 30 40 {SYNSETS[c]} 5 6 70 80 \n" for i, c in enumerate(truth)))
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("".join(f"{s} name {i}, other\n" for i, s in enumerate(SYNSETS)))
    val_txt = tmp_path / "val.txt"
    val_txt.write_text("".join(f"ILSVRC2012_val_{i + 1:08d}.JPEG {c}\n" for i, c in enumerate(truth)))

    rc, by_csv, _ = validate(capsys, folder, "--data", flat, "--labels", csv, "--class-index", mapping, "-q")
    assert rc == 0 and by_csv["data"]["labelled"] and by_csv["data"]["class_counts"][:3] == [2, 2, 2]
    rc, by_txt, _ = validate(capsys, folder, "--data", flat, "--labels", val_txt, "-q")
    assert rc == 0 and [r["top1"] for r in by_txt["artifacts"]] == [r["top1"] for r in by_csv["artifacts"]]
    assert "labels from LOC_val_solution.csv" in by_csv["data"]["source"]

    rc, _, err = validate(capsys, folder, "--data", flat, "--labels", csv)
    assert rc == 2 and err.count("\n") == 1 and "LOC_val_solution.csv:2: the label 'n01484850' is a class name; pass --class-index" in err
    csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 1 2 3 4\n")
    rc, _, err = validate(capsys, folder, "--data", flat, "--labels", csv, "--class-index", mapping)
    assert rc == 2 and "has no label for 5 of the 6 images, e.g. ILSVRC2012_val_00000002.JPEG" in err


def test_an_npy_is_memory_mapped_not_loaded(tmp_path):
    from calibration.sources import read_array
    from partialnet.variants import Preprocess

    np.save(tmp_path / "x.npy", np.zeros((5, 3, 64, 64), np.float32))
    arr = read_array(tmp_path / "x.npy", Preprocess(input_size=64), mmap=True)
    assert isinstance(arr, np.memmap) and arr.shape == (5, 3, 64, 64)


# --------------------------------------------------------------------------- the cluster


def test_cluster_without_dask_is_one_line_with_the_install_command(folder, labelled, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    rc, _, err = validate(capsys, folder, "--data", labelled, "--cluster", "local:2")
    assert rc == 2 and err.count("\n") == 1
    assert 'install the cluster extra: pip install -c constraints.txt -e ".[cluster]"' in err
    rc, _, err = validate(capsys, folder, "--cluster", "cluster.example:8786")
    assert rc == 2 and "expected local:N or tcp://HOST:PORT" in err


@pytest.mark.slow
def test_local_cluster_gives_the_single_process_figures(folder, labelled, capsys):
    pytest.importorskip("distributed")
    import torch

    # Without --threads the single-process run computes with this process's torch threads, which an earlier
    # in-process run with --threads may have changed; the Dask workers start as fresh processes do.
    fresh = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                               capture_output=True, text=True, check=True).stdout)
    before = torch.get_num_threads()
    torch.set_num_threads(fresh)
    try:
        _, single, _ = validate(capsys, folder, "--data", labelled, "--batch-size", "4", "-q")
        rc, clustered, _ = validate(capsys, folder, "--data", labelled, "--batch-size", "4", "--cluster", "local:2",
                                    "-q")
    finally:
        torch.set_num_threads(before)
    assert rc == 0 and clustered["throughput"]["cluster"] == "local:2"
    assert results(clustered) == results(single)  # to the last bit, not only the counts


@pytest.mark.slow
def test_tcp_cluster_on_a_scheduler_started_on_loopback(folder, labelled, capsys):
    distributed = pytest.importorskip("distributed")
    import logging

    _, single, _ = validate(capsys, folder, "--data", labelled, "--threads", "1", "-q")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1", scheduler_port=0,
                                  dashboard_address=None, silence_logs=logging.ERROR) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tcp://127.0.0.1:")
        rc, clustered, _ = validate(capsys, folder, "--data", labelled, "--threads", "1", "--cluster", address, "-q")
    assert rc == 0 and results(clustered) == results(single)
