"""Bad and odd inputs (issue 17): each gets an exit code, one line on stderr naming the cause, and leaves nothing
lost and nothing that looks complete behind.

One test (or a few) per defect the sweep found, numbered as in the issue, then the sweep's passing cases that no
other test covered.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deploy.cli import main
from partialnet.checkpoint import read_checkpoint

DATA = Path(__file__).parents[1] / "data" / "official"
TINY = DATA / "tiny_gelu_sp.ckpt"
X64 = DATA / "x64.npy"
QUICK = ["--input-size", "64", "-q", "--no-validate", "--no-bench"]


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    """The single line an error prints; fails if there is more, or a traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0]


def leftovers(parent: Path) -> list[str]:
    """Hidden staging folders or lock files an export left beside its destination."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"{path} holds a bare {name}: invalid JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One small export (ONNX Runtime and OpenVINO, fp32 + bf16 requested) shared by the read-only tests."""
    out = tmp_path_factory.mktemp("bad") / "t0"
    rc = main(["export", "partialnet_t0", "--checkpoint", str(TINY), "--output", str(out),
               "--backends", "onnxruntime,openvino", "--precisions", "bf16", *QUICK])
    assert rc == 0
    return out


@pytest.fixture
def state_dict():
    return {k: v.clone() for k, v in read_checkpoint(TINY).state_dict.items()}


# --------------------------------------------------------------------------- 1. NaN and Inf


def test_1_nan_weights_are_refused_before_any_export(tmp_path, state_dict, capsys):
    key = next(k for k, v in state_dict.items() if v.is_floating_point() and v.ndim == 4)
    state_dict[key].view(-1)[0] = float("nan")
    torch.save(state_dict, tmp_path / "t0_nan.pth")
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "export", "partialnet_t0", "--checkpoint", tmp_path / "t0_nan.pth", "--output", out,
                          *QUICK)
    line = one_line(err)
    assert rc == 1 and stdout == ""
    assert f"1 tensor(s) hold NaN or Inf values: {key} (1 NaN, 0 Inf)" in line and "earlier checkpoint" in line
    assert not out.exists() and leftovers(tmp_path) == []


def test_1_weights_that_fold_into_nan_are_refused(tmp_path, state_dict, capsys):
    key = next(k for k in state_dict if k.endswith("running_var"))
    state_dict[key][0] = -1.0  # finite, but sqrt(var + eps) is NaN: the fold divides by it
    torch.save(state_dict, tmp_path / "neg_var.pth")
    out = tmp_path / "out"
    rc, _, err = run(capsys, "export", "partialnet_t0", "--checkpoint", tmp_path / "neg_var.pth", "--output", out,
                     *QUICK)
    line = one_line(err)
    assert rc == 1 and "folding the normalizations" in line and "NaN or Inf" in line and "--no-reparam" in line
    assert not out.exists() and leftovers(tmp_path) == []


def test_1_nan_inputs_are_refused_and_nothing_is_saved(folder, tmp_path, capsys):
    x = np.load(X64)
    x[1, 0, 3, 3] = np.nan
    x[1, 1, 0, 0] = np.inf
    np.save(tmp_path / "nan.npy", x)
    y = tmp_path / "y.npy"
    for backend in ("eager", "onnxruntime", "openvino"):
        rc, stdout, err = run(capsys, "predict", folder, "--backend", backend, "--inputs", tmp_path / "nan.npy",
                              "--save-logits", y, "-q")
        line = one_line(err)
        assert rc == 2 and stdout == "" and not y.exists()
        assert "holds 1 NaN and 1 Inf value(s) in row 1 (1 of 2)" in line


def test_1_nan_logits_from_finite_inputs_are_refused(folder, tmp_path, capsys):
    np.save(tmp_path / "huge.npy", np.full((2, 3, 64, 64), 3e38, np.float32))  # finite; overflows in the first conv
    y = tmp_path / "y.npy"
    rc, stdout, err = run(capsys, "predict", folder, "--backend", "onnxruntime", "--inputs", tmp_path / "huge.npy",
                          "--save-logits", y)
    line = one_line(err)
    assert rc == 1 and stdout == "" and not y.exists()
    assert "produced NaN or Inf logits for huge.npy[0], huge.npy[1] (2 of 2 inputs)" in line


def test_1_nan_validation_and_calibration_arrays_are_refused(folder, tmp_path, capsys):
    x = np.load(X64)
    x[0, 2, 1, 1] = np.nan
    np.save(tmp_path / "nan.npy", x)
    rc, _, err = run(capsys, "validate", folder, "--data", tmp_path / "nan.npy")
    assert rc == 2 and "holds 1 NaN and 0 Inf value(s) in row 0 (1 of 2)" in one_line(err)
    assert not (folder / "validation.json").exists()
    out = tmp_path / "int8"
    rc, _, err = run(capsys, "export", "partialnet_t0", "--checkpoint", TINY, "--output", out, "--int8",
                     "--calib-data", tmp_path / "nan.npy", *QUICK)
    line = one_line(err)
    assert rc == 2 and "holds 1 NaN" in line and "AssertionError" not in line
    assert not out.exists() and leftovers(tmp_path) == ["nan.npy"] * 0


def test_1_a_nan_runner_fails_its_gate_naming_the_artifact_and_rows(folder, tmp_path, capsys, monkeypatch):
    from runtimes.ov import OpenVINORunner

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    original = OpenVINORunner.run

    def nan_first_row(self, feeds):
        out = original(self, feeds)
        for v in out.values():
            v[0, 0] = np.nan
        return out

    monkeypatch.setattr(OpenVINORunner, "run", nan_first_row)
    rc, stdout, err = run(capsys, "validate", copy, "--json", "-q", "--samples", "16", "--batch-size", "8")
    assert rc == 3
    doc = json.loads(stdout, parse_constant=lambda c: pytest.fail(f"bare {c} in --json output"))
    strict_json(copy / "validation.json")
    failed = {g["name"]: g["failures"] for g in doc["gates"] if not g["passed"]}
    fp32 = failed["openvino fp32 vs eager: fp32 tolerance"]
    assert fp32[0] == "the artifact's logits hold NaN or Inf on 2 of 16 rows"  # one per batch of 8
    ov = next(a for a in doc["artifacts"] if (a["backend"], a["precision"]) == ("openvino", "fp32"))
    assert ov["max_abs_logit_error"] is None and ov["cosine_similarity"] is None and ov["nonfinite_rows"] == 2
    assert ov["top1_agreement"] <= 14 / 16
    assert all(a["passed"] for a in doc["artifacts"] if a["backend"] == "onnxruntime")


def test_1_every_gate_fails_a_nan_figure():
    from runtimes.compare import TOLERANCES, Drift

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(16, 10))
    for bad in (np.nan, np.inf):
        cand = ref.copy()
        cand[5, 3] = bad
        d = Drift.between(ref, cand)
        assert d.nonfinite_rows == 1 and np.isnan(d.max_abs_logit_error) and np.isnan(d.cosine_similarity)
        for precision, tol in TOLERANCES.items():
            fails = tol.failures(d)
            assert fails and fails[0] == "the artifact's logits hold NaN or Inf on 1 of 16 rows", precision


def test_1_reports_are_valid_json_whatever_the_numbers(tmp_path):
    from partialnet.files import atomic_write_json

    atomic_write_json(tmp_path / "r.json", {"a": float("nan"), "b": [float("inf"), np.float32(-np.inf), 1.5]})
    assert strict_json(tmp_path / "r.json") == {"a": None, "b": [None, None, 1.5]}


# --------------------------------------------------------------------------- 2. --precisions


def test_2_precisions_add_to_fp32(folder):
    from deploy.precisions import parse_precisions

    m = json.loads((folder / "manifest.json").read_text())
    built = {(a["backend"], a["precision"]) for a in m["artifacts"]}
    assert {("onnxruntime", "fp32"), ("openvino", "fp32")} <= built  # --precisions bf16 did not drop fp32
    assert parse_precisions("bf16") == ("fp32", "bf16") and parse_precisions("fp16,fp32,fp16") == ("fp32", "fp16")


def test_2_an_unknown_precision_is_refused_before_work(tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run(capsys, "export", "partialnet_t0", "--checkpoint", TINY, "--output", out, "--precisions", "fp8",
                     *QUICK)
    line = one_line(err)
    assert rc == 2 and "unknown precision 'fp8' in --precisions; choose from fp32, fp16, bf16" in line
    assert not out.exists()
    rc, _, err = run(capsys, "export", "partialnet_t0", "--output", out, "--precisions", "int8", *QUICK)
    assert rc == 2 and "for INT8 pass --int8" in one_line(err) and not out.exists()


# --------------------------------------------------------------------------- 3. empty class folder


def _png(path: Path, color=(200, 30, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (70, 60), color).save(path)


def test_3_an_empty_class_folder_is_refused_not_shifted(folder, tmp_path, capsys):
    for cls in ("cat", "emu"):
        _png(tmp_path / "data" / cls / "a.png")
    (tmp_path / "data" / "dog").mkdir()
    rc, _, err = run(capsys, "validate", folder, "--data", tmp_path / "data")
    line = one_line(err)
    assert rc == 2 and "class subfolder(s) dog/ hold no images (3 subfolders, 2 with images)" in line
    assert "shift the label" in line and not (folder / "validation.json").exists()


def test_3_labels_follow_every_class_folder(tmp_path):
    from calibration.sources import image_files

    for cls in ("cat", "dog", "emu"):
        _png(tmp_path / cls / "a.png")
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    files, labels, names, _ = image_files(tmp_path)
    assert names == ["cat", "dog", "emu"] and labels == [0, 1, 2]


# --------------------------------------------------------------------------- 4. "pickled code"


def _bad_checkpoints(tmp_path: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    rand = tmp_path / "random.pth"
    rand.write_bytes(np.random.default_rng(0).bytes(4096))
    jpeg = tmp_path / "photo.pth"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(jpeg, format="JPEG")
    npy = tmp_path / "array.ckpt"
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(TINY.read_bytes()[: TINY.stat().st_size // 2])
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    return {
        "random bytes": (rand, "it starts with"),
        "jpeg": (jpeg, "it looks like a JPEG image"),
        "onnx": (folder / "model.onnx", "it looks like a protobuf file (an ONNX model?)"),
        "npy": (npy, "it looks like a NumPy .npy array"),
        "truncated": (truncated, "a zip archive whose end is missing"),
        "empty": (empty, "it is empty"),
    }


def test_4_a_file_that_is_not_a_pickle_is_named_for_what_it_is(folder, tmp_path, capsys):
    for name, (path, needle) in _bad_checkpoints(tmp_path, folder).items():
        rc, _, err = run(capsys, "info", "partialnet_t0", "--checkpoint", path)
        line = one_line(err)
        assert rc == 1, name
        assert "not a readable PyTorch checkpoint" in line and needle in line, (name, line)
        assert "pickled code" not in line and "--allow-pickle" not in line, (name, line)


def test_4_a_pickle_that_names_code_still_asks_about_trust(tmp_path, state_dict, capsys):
    import fractions

    torch.save({"state_dict": state_dict, "extra": fractions.Fraction(1, 3)}, tmp_path / "code.ckpt")
    rc, _, err = run(capsys, "info", "partialnet_t0", "--checkpoint", tmp_path / "code.ckpt")
    line = one_line(err)
    assert rc == 1 and "would run pickled code (fractions.Fraction)" in line and "--allow-pickle" in line


# --------------------------------------------------------------------------- 5. memory


def test_5_an_input_size_that_cannot_fit_is_refused_with_the_largest_that_does(tmp_path, capsys, monkeypatch):
    from partialnet.model import ArchConfig
    from partialnet.resources import USABLE_FRACTION, forward_memory, largest_fitting_size

    monkeypatch.setenv("PARTIALNET_MEMORY_LIMIT", str(2 << 30))
    rc, stdout, err = run(capsys, "info", "partialnet_t0", "--input-size", "4096")
    line = one_line(err)
    fits = largest_fitting_size(ArchConfig(), 1, int((2 << 30) * USABLE_FRACTION))
    assert rc == 2 and stdout == ""
    assert f"needs about {forward_memory(ArchConfig(), 4096, 1)} of memory" in line
    assert "16384 attention tokens" in line and f"the largest that fits: --input-size {fits} at batch 1" in line
    assert 32 <= fits < 4096 and fits % 32 == 0
    out = tmp_path / "out"
    rc, _, err = run(capsys, "export", "partialnet_t0", "--input-size", "4096", "--output", out, "-q")
    assert rc == 2 and "needs about" in one_line(err) and not out.exists()


def test_5_a_batch_that_cannot_fit_is_refused_before_bench(folder, tmp_path, capsys, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    monkeypatch.setenv("PARTIALNET_MEMORY_LIMIT", str(1 << 30))
    rc, _, err = run(capsys, "bench", copy, "--batch-sizes", "1,20000")
    line = one_line(err)
    assert rc == 2 and "deploy bench --batch-sizes 1,20000: a forward pass at 64 px and batch 20000" in line
    assert "the largest that fits: batch" in line
    assert not (copy / "bench.json").exists() and not (copy / "bench.png").exists()


# --------------------------------------------------------------------------- 6. --force


def test_6_force_refuses_a_folder_that_is_not_an_export(tmp_path, capsys):
    thesis = tmp_path / "thesis"
    (thesis / "figures").mkdir(parents=True)
    (thesis / "ch1.tex").write_text("years of work")
    rc, _, err = run(capsys, "export", "partialnet_t0", "--checkpoint", TINY, "--output", thesis, "--force", *QUICK)
    line = one_line(err)
    assert rc == 2 and "is not an export folder" in line and "it holds ch1.tex, figures/" in line
    assert (thesis / "ch1.tex").read_text() == "years of work" and (thesis / "figures").is_dir()
    assert leftovers(tmp_path) == []


def test_6_force_refuses_the_current_folder_up_front(tmp_path, capsys, monkeypatch):
    (tmp_path / "notes.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    for target in (".", ".."):
        rc, _, err = run(capsys, "export", "partialnet_t0", "--checkpoint", TINY, "--output", target, "--force", *QUICK)
        line = one_line(err)
        assert rc == 2 and "is the current folder" in line and "has an empty name" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_6_force_refuses_a_destination_holding_an_input(folder, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    shutil.copy(TINY, copy / "weights.ckpt")
    rc, _, err = run(capsys, "export", "partialnet_t0", "--checkpoint", copy / "weights.ckpt", "--output", copy,
                     "--force", *QUICK)
    assert rc == 2 and "holds an input of this export" in one_line(err)
    assert (copy / "weights.ckpt").is_file() and (copy / "manifest.json").is_file()


# --------------------------------------------------------------------------- 7. two exports, one folder


def test_7_a_second_export_to_a_folder_being_written_fails_at_once(tmp_path, capsys):
    from deploy.staging import FolderLock

    out = tmp_path / "out"
    lock = FolderLock(out).acquire()  # what a running export holds
    try:
        rc, _, err = run(capsys, "export", "partialnet_t0", "--checkpoint", TINY, "--output", out, *QUICK)
    finally:
        lock.release()
    line = one_line(err)
    assert rc == 1 and "another 'deploy export' is writing" in line and not out.exists()
    assert leftovers(tmp_path) == []


def test_7_a_destination_that_appears_meanwhile_is_kept(tmp_path, capsys, monkeypatch):
    import deploy.pipeline as pipeline

    out = tmp_path / "out"
    real = pipeline._export_into

    def other_process_finishes_first(*args, **kwargs):
        result = real(*args, **kwargs)
        out.mkdir()
        (out / "manifest.json").write_text('{"theirs": true}')
        return result

    monkeypatch.setattr(pipeline, "_export_into", other_process_finishes_first)
    rc, stdout, err = run(capsys, "export", "partialnet_t0", "--checkpoint", TINY, "--output", out, *QUICK)
    line = one_line(err)
    assert rc == 1 and stdout == "" and "appeared while this export ran" in line
    assert json.loads((out / "manifest.json").read_text()) == {"theirs": True}
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- 8. telemetry and Ctrl-C


def test_8_runtime_telemetry_is_off_in_our_processes():
    code = ("import os, sys; from deploy.cli import main; main(['list']);"
            "import openvino.tools.ovc.telemetry_utils as t; import nncf.telemetry.wrapper as w;"
            "print(t.tm.__name__, type(w.telemetry).__name__, os.environ.get('ORT_DISABLE_TELEMETRY'),"
            " sys.modules['openvino_telemetry'])")
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.splitlines()[-1] == "openvino.tools.ovc.telemetry_stub MagicMock 1 None"


@pytest.mark.slow
def test_8_ctrl_c_is_one_line_exit_130_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "deploy", "export", "partialnet_t0", "--checkpoint", str(TINY),
                          "--input-size", "64", "--output", str(out), "--int8", "-q"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not any(n.endswith(".partial") for n in os.listdir(tmp_path)) and p.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)  # into the work (export, conversion), where OpenVINO and NNCF are loaded
    os.killpg(p.pid, signal.SIGINT)  # what a terminal sends: the whole process group
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert stderr == "deploy: interrupted\n" and stdout == ""
    assert not out.exists() and os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- 9. read-only export


def test_9_an_export_whose_cache_cannot_be_written_runs_on_openvino(folder, tmp_path, capsys, monkeypatch):
    copy = tmp_path / "ro"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "openvino" / "cache", ignore_errors=True)
    (copy / "openvino" / "cache").write_text("")  # a file where the cache folder would go: it cannot be made
    if os.geteuid() != 0:  # root writes through permission bits; everyone else gets a truly read-only folder too
        for p in (copy, copy / "openvino"):
            p.chmod(0o555)
    ref = np.load(DATA / "tiny_gelu_sp_x64_logits.npy")
    y = tmp_path / "y.npy"
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
        rc, stdout, err = run(capsys, "predict", copy, "--backend", "openvino", "--inputs", X64, "--save-logits", y)
        assert rc == 0 and err.count("note:") == 1 and "caches compiled models in" in err
        assert np.abs(np.load(y) - ref).max() < 1e-3
        (tmp_path / "blocked").write_text("")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "blocked"))
        rc, stdout, err = run(capsys, "predict", copy, "--backend", "openvino", "--inputs", X64, "--save-logits", y,
                              "--force")
        assert rc == 0 and err.count("note:") == 1 and "compiles without a cache" in err
    finally:
        for p in (copy, copy / "openvino"):
            p.chmod(0o755)


# --------------------------------------------------------------------------- 10. cryptic internal errors


def test_10_bad_arrays_as_data_get_one_line_naming_the_cause(folder, tmp_path, capsys):
    (tmp_path / "random.npy").write_bytes(np.random.default_rng(1).bytes(2048))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "empty.npy", np.zeros((0, 3, 64, 64), np.float32))
    np.save(tmp_path / "full.npy", np.load(X64))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "full.npy").read_bytes()[:5000])
    cases = {"random.npy": "is not a NumPy .npy file", "objects.npy": "holds Python objects",
             "empty.npy": "holds float32 [0, 3, 64, 64]: no images", "cut.npy": "is truncated or damaged"}
    for name, needle in cases.items():
        for argv in (["validate", folder, "--data", tmp_path / name],
                     ["predict", folder, "--backend", "onnxruntime", "--inputs", tmp_path / name]):
            rc, _, err = run(capsys, *argv)
            line = one_line(err)
            assert rc == 2 and needle in line, (name, line)
            assert "allow_pickle" not in line and "unsafely" not in line and "concatenate" not in line
    out = tmp_path / "int8"
    rc, _, err = run(capsys, "export", "partialnet_t0", "--checkpoint", TINY, "--output", out, "--int8",
                     "--calib-data", tmp_path / "random.npy", *QUICK)
    assert rc == 2 and "is not a NumPy .npy file" in one_line(err) and not out.exists()


def test_10_a_full_disk_while_saving_openvino_ir_says_so(tmp_path, capsys, monkeypatch):
    import openvino as ov

    def disk_full(*args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(ov, "save_model", disk_full)
    out = tmp_path / "out"
    rc, _, err = run(capsys, "export", "partialnet_t0", "--checkpoint", TINY, "--output", out,
                     "--backends", "openvino", *QUICK)
    line = one_line(err)
    assert rc == 1 and "OpenVINO could not write the IR model.xml" in line
    assert "free on that disk, and a full disk is the usual cause" in line
    assert not out.exists() and leftovers(tmp_path) == []


def test_10_a_full_disk_on_any_atomic_write_says_so(tmp_path, monkeypatch):
    import partialnet.files as files
    from partialnet.errors import DeployError

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "replace", no_space)
    with pytest.raises(DeployError, match=r"cannot write .*r\.json: no space left on the device \(.* free there\)"):
        files.atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- 11. --opset


def test_11_a_bad_opset_is_one_line_and_stdout_stays_empty(tmp_path, capfd):
    out = tmp_path / "out"
    for opset in ("99", "6"):
        rc = main(["export", "partialnet_t0", "--checkpoint", str(TINY), "--output", str(out), "--opset", opset, *QUICK])
        stdout, err = capfd.readouterr()
        line = one_line(err)
        assert rc == 2 and stdout == "" and f"--opset {opset} is outside what the torchscript exporter writes" in line
    assert not out.exists() and leftovers(tmp_path) == []


def test_11_export_stdout_is_only_the_folder(tmp_path, capfd):
    out = tmp_path / "out"
    rc = main(["export", "partialnet_t0", "--checkpoint", str(TINY), "--output", str(out), "--opset", "17",
               "--backends", "onnxruntime", *QUICK])
    stdout, _ = capfd.readouterr()
    assert rc == 0 and stdout == f"{out}\n"


# --------------------------------------------------------------------------- 12. --threads


def test_12_threads_above_the_usable_cpus_are_refused(folder, tmp_path, capsys):
    from runtimes.cpu import usable_cpus

    too_many = usable_cpus() + 1
    for argv in (["bench", folder, "-q"], ["validate", folder, "-q"], ["predict", folder, "--inputs", X64, "-q"],
                 ["export", "partialnet_t0", "--output", tmp_path / "out", *QUICK]):
        rc, _, err = run(capsys, *argv, "--threads", too_many)
        line = one_line(err)
        assert rc == 2 and f"{too_many} is more than the {usable_cpus()} CPU(s) this process can use" in line
    assert not (folder / "bench.json").exists() and not (tmp_path / "out").exists()


def test_12_every_bench_row_shows_the_threads_it_ran_with(folder, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    rc, stdout, _ = run(capsys, "bench", copy, "--threads", "1", "--batch-sizes", "1", "--warmup-s", "0",
                        "--duration-s", "0.05", "--json", "-q")
    rows = json.loads(stdout)["rows"]
    assert rc == 0 and {r["backend"] for r in rows} == {"eager", "onnxruntime", "openvino"}
    assert [r["threads"] for r in rows] == [1] * len(rows)


# --------------------------------------------------------------------------- the INT8 near-tie gate


def test_near_ties_do_not_fail_the_ranking_gate_but_a_decided_flip_does():
    from runtimes.compare import TOLERANCES, Drift

    rng = np.random.default_rng(0)
    n, k = 64, 10
    ref = rng.normal(size=(n, k))
    top = ref.argmax(1)
    ref[np.arange(n), top] += 2.0  # decided images: margin about 2
    tie = np.arange(8)  # 8 near-ties: the runner-up within 0.01 of the top
    runner_up = (top[tie] + 1) % k
    ref[tie, runner_up] = ref[tie, top[tie]] - 0.01
    cand = ref + rng.normal(scale=0.02, size=ref.shape)
    cand[tie, runner_up] = cand[tie, top[tie]] + 0.05  # every near-tie flips: raw agreement 56/64 = 0.875
    d = Drift.between(ref, cand)
    assert d.top1_agreement == 0.875 and d.decided_samples == n - 8 and d.decided_top1_agreement == 1.0
    assert TOLERANCES["int8"].failures(d) == []
    flipped = cand.copy()
    for i in range(8, 16):  # 8 images decided by about 2 logits change their top-1: an error, not a tie
        flipped[i, (top[i] + 1) % k] = ref[i, top[i]] + 1.0
    d = Drift.between(ref, flipped)
    assert d.decided_samples == n - 8  # the real flips' large errors do not raise the bar (robust noise)
    fail = TOLERANCES["int8"].failures(d)[0]
    assert fail.startswith(f"top-1 agreement {48 / 56:.4f} on the 56 of 64 images whose eager margin exceeds")
    assert fail.endswith("is below 0.9000 (all images: 0.7500)")
    rule = TOLERANCES["int8"].to_dict()["rule"]
    assert "near-ties, reported but not gated" in rule and "cosine similarity of the logits >= 0.97" in rule


# --------------------------------------------------------------------------- the sweep's passing cases


def test_sweep_a_tampered_manifest_hash_or_truncated_artifact_is_caught(folder, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    onnx_bytes = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(onnx_bytes[: len(onnx_bytes) // 2])
    rc, _, err = run(capsys, "predict", copy, "--backend", "onnxruntime", "--inputs", X64)
    assert rc == 1 and "model.onnx has sha256" in one_line(err)
    (copy / "model.onnx").write_bytes(onnx_bytes)
    m = json.loads((copy / "manifest.json").read_text())
    m["artifacts"][0]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(m))
    rc, _, err = run(capsys, "predict", copy, "--backend", "onnxruntime", "--inputs", X64)
    assert rc == 1 and "model.onnx has sha256" in one_line(err)
    (copy / "manifest.json").write_text("{ truncated")
    rc, _, err = run(capsys, "predict", copy, "--backend", "onnxruntime", "--inputs", X64)
    assert rc == 1 and "manifest.json" in one_line(err)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_sweep_odd_image_modes_are_converted_like_rgb(folder, tmp_path, capsys, mode):
    ext = "jpg" if mode == "CMYK" else "png"
    path = tmp_path / f"img.{ext}"
    Image.new("RGB", (80, 60), (120, 200, 40)).convert(mode).save(path)
    rc, stdout, err = run(capsys, "predict", folder, "--backend", "onnxruntime", path, "--topk", "1")
    assert rc == 0 and stdout.startswith(f"{path}: ") and "error" not in err


def test_sweep_a_stale_staging_folder_is_cleared_and_never_looks_complete(tmp_path, capsys):
    out = tmp_path / "out"
    stale = tmp_path / ".out.killed.partial"  # what a SIGKILLed export leaves
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    rc, stdout, _ = run(capsys, "export", "partialnet_t0", "--checkpoint", TINY, "--output", out,
                        "--backends", "onnxruntime", *QUICK)
    assert rc == 0 and stdout == f"{out}\n" and (out / "manifest.json").is_file()
    assert leftovers(tmp_path) == []


def test_sweep_an_interrupted_export_leaves_nothing(tmp_path, capsys, monkeypatch):
    import deploy.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_export_into", interrupted)
    out = tmp_path / "out"
    rc, stdout, err = run(capsys, "export", "partialnet_t0", "--checkpoint", TINY, "--output", out, *QUICK)
    assert rc == 130 and stdout == "" and err == "deploy: interrupted\n"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("text,needle", [("null", "it holds null, not a JSON object"),
                                         ("[]", "it holds an array, not a JSON object"),
                                         ('{"variant": "partialnet_t0"}', "KeyError: 'artifacts'")])
def test_sweep_a_manifest_that_is_not_one_is_one_line(folder, tmp_path, capsys, text, needle):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "manifest.json").write_text(text)
    rc, _, err = run(capsys, "predict", copy, "--backend", "onnxruntime", "--inputs", X64)
    line = one_line(err)
    assert rc == 1 and "manifest.json is not a valid manifest" in line and needle in line
