"""argparse value types shared by every `deploy` subcommand: each refuses a bad value with one line (exit 2).

Light on purpose: `import deploy.cli` imports this, so nothing here loads torch or a runtime.
"""
from __future__ import annotations

import argparse

from partialnet.errors import UsageError


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def threads(text: str) -> int:
    from runtimes.cpu import check_threads

    try:
        return check_threads(positive_int(text))
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--threads ").rstrip(".")) from None


def input_size(text: str) -> int:
    value = positive_int(text)
    if value % 32:
        raise argparse.ArgumentTypeError(
            f"input size {value} is not a multiple of 32 (the last stage works on N/32 maps); try {max(32, round(value / 32) * 32)}"
        )
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port (1-65535), got {value}")
    return value


def cluster(text: str) -> str:
    """local:N (a Dask LocalCluster of N processes on 127.0.0.1) or tcp://HOST:PORT (a running scheduler)."""
    if text.startswith("local:"):
        try:
            positive_int(text.split(":", 1)[1])
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected local:N with N worker processes >= 1, got {text!r}") from None
        return text
    host, _, port_text = text.removeprefix("tcp://").rpartition(":")
    if not text.startswith("tcp://") or not host:
        raise argparse.ArgumentTypeError(f"expected local:N or tcp://HOST:PORT, got {text!r}")
    port(port_text)
    return text


def rgb_triple(text: str) -> tuple[float, float, float]:
    """`0.5,0.5,0.5`: one number per RGB channel (--mean, --std)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers (R,G,B), got {text!r}") from None
    if len(values) != 3 or not all(abs(v) < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected three finite comma-separated numbers (R,G,B), got {text!r}")
    return values  # type: ignore[return-value]


def positive_triple(text: str) -> tuple[float, float, float]:
    values = rgb_triple(text)
    if min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected three numbers > 0 (R,G,B), got {text!r}")
    return values
