"""FID and KID are the same bits whatever thread count the process runs, so ``guidekit eval`` gives bitwise-equal
metrics with 1 or 2 processes (``accelerate launch`` and a plain ``python`` run different thread counts)."""

from __future__ import annotations

import os
import subprocess
import sys

# Rank-deficient statistics in Inception's 2048 dimensions (64 and 48 samples), as a small `guidekit eval` run makes:
# numpy's multi-threaded eigh and torch's multi-threaded matrix products change FID and KID in their last bits here.
SCRIPT = """
import numpy as np
from guidekit.evaluation import frechet_distance, kernel_inception_distance
from guidekit.evaluation.stats import RunningStatistics
rng = np.random.default_rng(0)
fake, real = rng.gamma(2.0, size=(64, 2048)).astype(np.float32), rng.gamma(2.0, size=(48, 2048)).astype(np.float32)
stats = [RunningStatistics(2048).update(x) for x in (fake, real)]
fid = frechet_distance(stats[0].mean, stats[0].covariance, stats[1].mean, stats[1].covariance)
kid = kernel_inception_distance(real[:32], fake, num_subsets=10, subset_size=32)
print(fid.hex(), *(value.hex() for value in kid))
"""


def _metrics(threads: int) -> str:
    env = {**os.environ, **dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), str(threads))}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_fid_and_kid_do_not_depend_on_the_thread_count() -> None:
    assert _metrics(2) == _metrics(1)
