"""The README's two commands are the ones CI runs and the packaging installs."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    return [line.strip() for line in (ROOT / "README.md").read_text().splitlines()[:12] if line.startswith("    ")]


def test_ci_runs_exactly_the_readme_test_command():
    main_job, tests = _readme_commands()
    assert "deploy export partialnet_t0 --int8" in main_job and "pytest" in tests
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci


def test_both_commands_install_with_the_constraints_and_pin_cpu_torch():
    for command in _readme_commands():
        assert "-c constraints.txt" in command
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M))
    assert pins["torch"].endswith("+cpu")
    for name in ("onnx", "onnxruntime", "onnxsim", "openvino", "nncf", "numpy", "pillow", "pytest"):
        assert name in pins, name
