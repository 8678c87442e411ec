"""--precisions: the float precisions an export builds besides fp32, which it always builds."""
from __future__ import annotations

import difflib
from typing import Iterable

from partialnet.errors import UsageError

def float_precisions() -> tuple[str, ...]:
    """The float precisions some registered backend builds from the FP32 ONNX, in PRECISIONS order; INT8 is --int8."""
    from export.manifest import PRECISIONS

    from . import backends

    built = {p for b in backends.artifact_backends() for p in b.float_precisions}
    return tuple(p for p in PRECISIONS if p in built)


def parse_precisions(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """'bf16' -> ('fp32', 'bf16'): fp32 first and always, the rest in the order given, an unknown name refused."""
    FLOAT_PRECISIONS = float_precisions()
    if text is None:
        names: list[str] = []
    elif isinstance(text, str):
        names = [p.strip().lower() for p in text.split(",") if p.strip()]
    else:
        names = [str(p).strip().lower() for p in text if str(p).strip()]
    for name in names:
        if name in FLOAT_PRECISIONS:
            continue
        if name.startswith("int8"):
            raise UsageError(f"--precisions takes float precisions ({', '.join(FLOAT_PRECISIONS)}); for INT8 pass --int8.")
        close = difflib.get_close_matches(name, FLOAT_PRECISIONS, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise UsageError(f"unknown precision {name!r} in --precisions; choose from {', '.join(FLOAT_PRECISIONS)} "
                         f"(fp32 is always built).{hint}")
    out = ["fp32"]
    out += [n for n in dict.fromkeys(names) if n != "fp32"]
    return tuple(out)
