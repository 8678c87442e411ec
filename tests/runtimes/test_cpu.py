"""runtimes/cpu.py: which x86 CPUs add int8 products in saturating 16-bit arithmetic."""
from __future__ import annotations

import pytest

from runtimes.cpu import int8_dot_saturates


@pytest.mark.parametrize("flags, saturates", [
    ({"avx2", "fma"}, True), ({"avx2", "avx512f"}, True), ({"avx2", "avx512_vnni"}, False),
    ({"avx2", "avx_vnni"}, False), ({"avx2", "amx_int8"}, False)])
def test_which_x86_cpus_saturate_int8_dot_products(flags, saturates):
    assert int8_dot_saturates(frozenset(flags)) is saturates
