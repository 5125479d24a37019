"""The sanitized emulated build (`make sanitize`: tripletloss_emu_san under AddressSanitizer and UndefinedBehaviorSanitizer)
catches what compute-sanitizer's memcheck catches on a GPU: a read past the end of an array and a 16-byte
vector load from a misaligned address abort the process with the sanitizer's report. Each runs in a child
process (the sanitizers stop at the first error: -fno-sanitize-recover)."""

import subprocess
import sys

import pytest
from emulated import EMU_LIB

pytestmark = pytest.mark.sanitizer


@pytest.mark.parametrize(
    ("kernel", "report"),
    [
        ("read_past_the_end", "AddressSanitizer: heap-buffer-overflow"),
        ("misaligned_vector_load", "misaligned address"),
    ],
)
def test_sanitizer_catches(kernel, report):
    # torch first: the module links libc10/libtorch, which the loader finds only once torch has loaded them.
    code = f"import sys, torch; sys.path.append({EMU_LIB!r}); import tripletloss_emu_san as e; e.selftest({kernel!r})"
    child = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert child.returncode != 0, child.stderr[-2000:]
    assert report in child.stderr and kernel in child.stderr, child.stderr[-4000:]
