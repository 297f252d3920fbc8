"""Allocator tuning for the command-line merge."""

from __future__ import annotations

import platform
import sys

from guardmerge.merge.allocator import tune_for_streaming


def test_tuning_applies_on_glibc_and_is_a_no_op_elsewhere() -> None:
    applied = tune_for_streaming()
    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert applied is on_glibc
