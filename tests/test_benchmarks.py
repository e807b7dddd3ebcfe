"""The dry run of benchmarks/gpu.py: the GPU figures' code paths on the CPU with tiny sizes, so they cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_dry_run_writes_every_section(tmp_path: Path) -> None:
    report = tmp_path / "gpu.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--out", str(report)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = report.read_text()
    assert "FAILED" not in text and "Not run" not in text, text
    for section in ("## 1. Overhead", "## 2. Combination cost", "## 3. Savings by batch", "## 4. Evaluation",
                    "## 5. torch.compile"):
        assert section in text, section
    # Every method of combine_cost.py has its row, with kernels and host syncs; the whole-batch paths sync nowhere.
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines()
            if line.startswith("| ") and line.count("|") == 6}
    for method in ("CFG", "APG", "CFGZeroStar", "CFG + PAG", "FDG((10, 5))"):
        assert rows[method][-1].strip(" |") == "0", rows[method]
    assert rows["AdaptiveGuidance(CFG)"][-1].strip(" |") == "1"  # its switch decisions are read back once per call
    # Savings: Interval computes fewer rows than CFG at every batch size, and the row ratio is the stats' own.
    for batch in (1, 2):
        line = next(x for x in text.splitlines() if x.startswith(f"| {batch} | Interval(CFG)"))
        assert 0 < float(line.split(" | ")[4]) < 1, line
    assert "| CFG(5) |" in text and "| Interval(CFG(5), 0.28, 5.42) |" in text
