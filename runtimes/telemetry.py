"""Usage telemetry of the runtimes (OpenVINO, NNCF, ONNX Runtime), off for this tool's processes.

Both send anonymous usage data through the `openvino_telemetry` package unless the user ran its `opt_in_out
--opt_out` (a per-user consent file, which this tool does not write for them). Each send may fork a child process
that reaches the network, and on Ctrl-C those children print their own tracebacks. OpenVINO's converter and NNCF
each ship a no-op stand-in that they use when `openvino_telemetry` cannot be imported; marking the package
unimportable in this process (sys.modules[name] = None) selects that stand-in, changes nothing on disk and
nothing for other programs.

ONNX Runtime's Linux builds (1.29 on) send 1DS telemetry unless ORT_DISABLE_TELEMETRY is set when the library
loads; this process sets it (unless the user set it either way) before anything imports onnxruntime.
"""
from __future__ import annotations

import os
import sys

PACKAGE = "openvino_telemetry"


def disable_openvino_telemetry() -> bool:
    """Make `openvino_telemetry` unimportable in this process; False if it was already imported (too late)."""
    if sys.modules.get(PACKAGE, None) is not None:
        return False
    sys.modules[PACKAGE] = None  # type: ignore[assignment]  # import raises ImportError: the libraries' stubs
    return True


def disable_onnxruntime_telemetry() -> None:
    """Set ORT_DISABLE_TELEMETRY for this process (read when onnxruntime loads), unless the user set it already."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def disable_telemetry() -> None:
    """Every runtime's telemetry off for this process; call before importing any of them."""
    disable_onnxruntime_telemetry()
    disable_openvino_telemetry()
