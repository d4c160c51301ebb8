"""A short, bounded run of the coverage-guided fuzzer of the input path
(``tests/fuzz/fuzz_inputs.py``: decode -> validate -> decide for Kafka records and gRPC requests).

The fuzzer runs in a subprocess (atheris instruments the service's modules at import, which must
not happen inside the pytest process) with a fixed seed, a scratch corpus directory first (libFuzzer
writes new inputs there, never into the committed seeds) and a cap on both runs and time. It must
exit 0 (no finding), have executed a floor of inputs, and every target must have reached its
engine path (decided events, answered gRPC calls, labels taken in), so a harness that stopped
reaching the decisions fails here too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "fuzz" / "corpus"
RUNS = 20_000
MAX_TIME_S = 30
MIN_RUNS = 3_000  # executed inputs needed for the run to count (seeds included)


def _fuzz(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PAIRSIEVE_FUZZ_STATS": str(tmp_path / "stats.json")}
    return subprocess.run([sys.executable, "-m", "tests.fuzz.fuzz_inputs", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _tail(proc: subprocess.CompletedProcess, n: int = 60) -> str:
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines()
             if not ln.startswith("INFO: Instrumenting")]
    return "\n".join(lines[-n:])


def test_the_committed_seed_corpus_is_what_the_generator_writes(tmp_path):
    proc = _fuzz(tmp_path, "--check-seeds", str(CORPUS))
    assert proc.returncode == 0, (
        "tests/fuzz/corpus differs from seeds(); regenerate it with "
        f"`python -m tests.fuzz.fuzz_inputs --write-seeds tests/fuzz/corpus`:\n{_tail(proc)}")
    assert sum(p.stat().st_size for p in CORPUS.iterdir()) < 50_000


@pytest.mark.slow
def test_a_short_fuzz_run_finds_nothing_and_reaches_every_target(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    proc = _fuzz(tmp_path, f"-runs={RUNS}", f"-max_total_time={MAX_TIME_S}", "-seed=1",
                 "-timeout=20", f"-artifact_prefix={tmp_path}/", str(work), str(CORPUS))
    out = proc.stdout + proc.stderr
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-",
                                                                             "timeout-", "oom-")))
    assert proc.returncode == 0 and not crashes, (
        f"the fuzzer found something (exit {proc.returncode}, artifacts {crashes}):\n"
        f"{_tail(proc)}")
    done = re.findall(r"^Done (\d+) runs in (\d+) second", out, re.MULTILINE)
    assert done, f"no libFuzzer final stats line:\n{_tail(proc)}"
    runs = int(done[-1][0])
    assert runs >= MIN_RUNS, f"only {runs} inputs executed:\n{_tail(proc)}"
    assert re.search(r"INITED cov: \d+", out), _tail(proc)

    stats = json.loads((tmp_path / "stats.json").read_text())
    t = stats["targets"]
    assert stats["runs"] >= MIN_RUNS - 50
    assert all(t[name].get("runs", 0) > 0 for name in t), t
    # the features record path reaches the decisions, and the documented rejections occur
    assert t["features"].get("decided", 0) > 0 and t["features"].get("accepted", 0) > 0, t
    for reason in ("undecodable", "wrong_dimension", "non_finite", "oversized"):
        assert t["features"].get(f"wire:{reason}", 0) > 0, (reason, t["features"])
    # labels reach the learning loop; gRPC methods answer and refuse
    assert t["label"].get("label_accepted", 0) + t["label"].get("label_unresolved", 0) > 0, t
    for name in ("grpc_submit", "grpc_pool", "grpc_report", "grpc_status"):
        assert t[name].get("ok", 0) > 0 and t[name].get("invalid_argument", 0) > 0, (name, t)
    assert t["grpc_submit"].get("accepted", 0) > 0, t
