"""Cold start: the default strategy with W random warm-up accepts against 50, paired by seed.

Usage::

    python scripts/check_warmup.py DATASET MODES FIRST-LAST WARMUPS
    python scripts/check_warmup.py emoji-image-name pool,stream 100-120 50,0,20

Prints, per mode and warm-up, the mean R@1 at 50 / 100 / 300 pairs and the AUC difference
(x1000) against the first warm-up listed, ± standard error over the seeds (tuning seeds only:
never the report's 0-19). Stream runs use the learner's view of the service (``seen``).
"""

from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from service.evaluation import curves
from service.evaluation.datasets import get_dataset
from service.evaluation.quality import _init_worker
from service.evaluation.simulator import SimConfig, simulate

POINTS = np.array([50.0, 100.0, 300.0])


def run(job: tuple[str, str, int, int]) -> tuple[tuple[str, str, int, int], float, np.ndarray]:
    dataset, mode, seed, warmup = job
    res = simulate(get_dataset(dataset, seed=seed),
                   SimConfig(strategy="default", mode=mode, seed=seed, warmup=warmup,
                             stream_unpaired="seen"))
    return job, curves.auc(res["curve"], 300), curves.on_grid(res["curve"], POINTS)


def main(argv: list[str]) -> None:
    if len(argv) != 4:
        raise SystemExit(__doc__)
    dataset, modes = argv[0], argv[1].split(",")
    first, last = (int(x) for x in argv[2].split("-"))
    warmups = [int(x) for x in argv[3].split(",")]
    todo = [(dataset, m, s, w) for m in modes for s in range(first, last) for w in warmups]
    with ProcessPoolExecutor(2, initializer=_init_worker) as ex:
        out = list(ex.map(run, todo))
    for m in modes:
        ref = {job[2]: auc for job, auc, _ in out if job[1] == m and job[3] == warmups[0]}
        for w in warmups:
            rows = [(job, auc, r1) for job, auc, r1 in out if job[1] == m and job[3] == w]
            d = 1000 * np.array([auc - ref[job[2]] for job, auc, _ in rows])
            r1 = np.array([r for _, _, r in rows]).mean(axis=0)
            se = d.std(ddof=1) / np.sqrt(len(d))
            print(f"{dataset} {m} warm-up {w}: R@1 at 50/100/300 {np.round(r1, 3)}  "
                  f"AUC x1000 vs {warmups[0]}: {d.mean():+.1f} ± {se:.1f} "
                  f"({int((d > 0).sum())}/{len(d)})")


if __name__ == "__main__":
    main(sys.argv[1:])
