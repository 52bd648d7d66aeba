"""Large fresh outputs of the CPU kernels are advised as transparent huge pages
(csrc/cpu/huge_pages.h): where the kernel honours madvise(MADV_HUGEPAGE), the output's
mapping must hold huge pages after the kernel wrote it."""
import re
from pathlib import Path

import pytest
import torch

from bisenet_fast import ops

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    if not THP.exists():
        return None
    match = re.search(r"\[(\w+)\]", THP.read_text())
    return match.group(1) if match else None


def anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping of this process that contains `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head.group(1), 16) <= address < int(head.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds address {address:#x}")


@pytest.mark.skipif(thp_mode() not in ("madvise", "always"), reason="transparent huge pages off or unknown here")
def test_fresh_large_output_gets_huge_pages():
    x = torch.randn(1, 19, 64, 128)
    with torch.no_grad():
        out = ops.resize_bilinear(x, (512, 1024))  # 40 MB: a fresh mapping of its own
    # The advice covers the 2 MiB-aligned interior (madvise splits the mapping there).
    assert anon_huge_kb(out.data_ptr() + out.nbytes // 2) > 0
