"""Large fresh outputs of the CPU kernels are advised as transparent huge pages
(csrc/cpu/huge_pages.h): where the OS honours madvise(MADV_HUGEPAGE), a fresh output's
mapping must hold huge pages after the kernel wrote it."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    if not THP.exists():
        return None
    match = re.search(r"\[(\w+)\]", THP.read_text())
    return match.group(1) if match else None


# Run in a fresh interpreter: there the 40 MB output is a fresh mapping of its own, while in
# a long test process the allocator may hand back heap memory that is already mapped (no
# page faults to save, and no huge pages to see).
PROBE = """
import re, sys, torch
from pathlib import Path
from bisenet_fast import ops

with torch.no_grad():
    out = ops.resize_bilinear(torch.randn(1, 19, 64, 128), (512, 1024))
address = out.data_ptr() + out.nbytes // 2  # the advice covers the 2 MiB-aligned interior
inside = False
for line in Path("/proc/self/smaps").read_text().splitlines():
    head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
    if head:
        inside = int(head.group(1), 16) <= address < int(head.group(2), 16)
    elif inside and line.startswith("AnonHugePages:"):
        print(int(line.split()[1]))
        sys.exit(0)
sys.exit("no mapping holds the output")
"""


@pytest.mark.skipif(thp_mode() not in ("madvise", "always"), reason="transparent huge pages off or unknown here")
def test_fresh_large_output_gets_huge_pages():
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert int(probe.stdout.split()[-1]) > 0, "the output's mapping holds no huge pages"
