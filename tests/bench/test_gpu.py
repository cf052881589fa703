"""The GPU section of ``make bench`` runs end to end (on the CPU here) so a lent GPU's minutes are not lost to a bug."""

import re

from tests.bench.main import bench_gpu


def test_gpu_section_dry_run_on_cpu():
    lines = bench_gpu("32x32_small", blocks=(9, 12), batches=(2, 4), repeats=1, device="cpu")
    assert lines[0].startswith("gpu: cpu (a dry run")
    assert len(lines) == 3
    for line in lines[1:]:
        match = re.search(r"truncated\s+([\d.]+) images/s, full forward \+ hooks\s+([\d.]+) images/s", line)
        assert match and float(match.group(1)) > 0 and float(match.group(2)) > 0
