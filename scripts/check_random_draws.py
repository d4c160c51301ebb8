"""Is ``random``'s first draw (strategy seed = the seed) a fair draw? Random draws 0-3 and
``random-replicate`` against the mean of draws 1-3, paired by seed.

Usage::

    python scripts/check_random_draws.py DATASET MODE FIRST-LAST
    python scripts/check_random_draws.py emoji-image-name stream 100-140

Every arm is ``random`` on the same split and stream order; only the strategy seed differs, so each
line should be zero within its standard error. Prints AUC x1000 ± standard error over the seeds
(tuning seeds only: never the report's 0-19). Stream runs use the learner's view of the service.
"""

from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from service.evaluation import curves
from service.evaluation.quality import REPLICATE, Job, _init_worker, _mean_sem, _run_job

BUDGET = 300
DRAWS = 4


def run(job: Job) -> tuple[Job, float]:
    return job, curves.auc(_run_job(job)["curve"], BUDGET)


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise SystemExit(__doc__)
    dataset, mode = argv[0], argv[1]
    first, last = (int(x) for x in argv[2].split("-"))
    seeds = range(first, last)
    todo = [Job(dataset, mode, "random", s, BUDGET, d) for s in seeds for d in range(DRAWS)]
    todo += [Job(dataset, mode, REPLICATE, s, BUDGET) for s in seeds]
    with ProcessPoolExecutor(2, initializer=_init_worker) as ex:
        auc = {(j.strategy, j.seed, j.draw): a for j, a in ex.map(run, todo)}
    ref = np.array([np.mean([auc[("random", s, d)] for d in range(1, DRAWS)]) for s in seeds])
    arms = {f"random draw {d}": [("random", s, d) for s in seeds] for d in range(DRAWS)}
    arms[REPLICATE] = [(REPLICATE, s, 0) for s in seeds]
    for name, keys in arms.items():
        mean, sem = _mean_sem(1000 * (np.array([auc[k] for k in keys]) - ref))
        print(f"{dataset} {mode} {name}: AUC x1000 vs the mean of draws 1-{DRAWS - 1} "
              f"{mean:+.1f} ± {sem:.1f} ({len(keys)} seeds)")


if __name__ == "__main__":
    main(sys.argv[1:])
