"""Whether the `serve` extra is installed, checked before anything starts, and the environment its server needs."""
from __future__ import annotations

import importlib.util
import os
import sysconfig
from importlib import metadata

from partialnet.errors import DeployError

INSTALL_HINT = "pip install -c constraints.txt -e '.[serve]'"


class ServeExtraMissing(DeployError):
    """PyTriton or tritonclient is not installed."""


def require(*modules: str, command: str) -> None:
    """Raise one line naming what is missing and how to install it, if any of `modules` cannot be imported."""
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append({"pytriton": "nvidia-pytriton", "tritonclient": "tritonclient"}.get(module, module))
    if missing:
        raise ServeExtraMissing(
            f"deploy {command} needs the serve extra ({', '.join(missing)} not installed); install it with "
            f"`{INSTALL_HINT}`."
        )
    if "pytriton" in modules:
        numpy = metadata.version("numpy")
        if int(numpy.split(".")[0]) >= 2:
            # The wheel's Python-backend stub is built for the NumPy 1 ABI: with NumPy 2 every answer would be a 500.
            raise ServeExtraMissing(
                f"nvidia-pytriton 0.7.0 needs NumPy 1 (its Python-backend stub is built for the NumPy 1 ABI) but "
                f"NumPy {numpy} is installed; reinstall with `{INSTALL_HINT}` (it pins numpy 1.26.4)."
            )


def prepare_server_environment() -> None:
    """Let the Python backend's stub load this interpreter's libpython.

    PyTriton starts tritonserver with this environment; without the interpreter's LIBDIR on LD_LIBRARY_PATH the stub
    can pick up another libpython and fail with "'_thread.RLock' object has no attribute '_recursion_count'".
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    current = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if libdir and libdir not in current:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *current])
