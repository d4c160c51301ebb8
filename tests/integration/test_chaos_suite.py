"""The chaos suite's short version (``python -m loadtests.chaos --short``) runs in ``make test``:
real ``pairsieve serve`` workers killed with SIGKILL (1 and 2 workers, and with a history on the
topics), 16 kinds of poison, a paused broker, a broker killed and restarted on durable storage
and hostile gRPC traffic; every check must pass (timings are reported, not judged, here). After
the broker restart, about 1 run in 7 shows one request record written twice (same bytes: a retry
after an acknowledgement lost with the killed broker; tansu refuses an idempotent producer): the
suite reports it apart from an event decided twice, which must never happen.
(The fuzz scenario is left to ``tests/unit/test_fuzz_inputs.py``, which runs the same fuzzer.)
The full version writes ``reports/reliability.md`` (``make chaos``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtests.chaos import LIMIT, _sized_batch, decided_id_at, decision_rate, poison_records
from service.wire import codecs

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_poison_records_are_what_the_suite_says_they_are():
    """The suite's expectations hold at the codec: each features poison is refused with its
    reason, each label poison at decoding (or, for the unknown item and bad partner, is a
    well-formed label the engine must refuse); sized records are exact."""
    rng = np.random.default_rng(0)
    dims = {"image": 32, "text": 16}
    for size in (LIMIT - 1, LIMIT, LIMIT + 1):
        assert len(_sized_batch(size, "t", rng)) == size
    records = poison_records(rng, "t")
    assert len({kind for kind, *_ in records}) >= 12
    for kind, reason, value, headers in records:
        if kind.startswith("features"):
            with pytest.raises(codecs.WireError) as err:
                codecs.decode_feature_record(value, headers, dims, LIMIT)
            assert err.value.reason == reason, kind
        elif reason == "undecodable":
            with pytest.raises(Exception, match="parsing|corrupt|Error"):
                codecs.pb.AlignmentLabel.FromString(value)
        elif reason in ("out_of_range", "non_finite", "wrong_dimension"):
            with pytest.raises(codecs.WireError) as err:
                codecs.label_from_proto(codecs.pb.AlignmentLabel.FromString(value), dims)
            assert err.value.reason == reason, kind
        else:  # label_unresolved: decodes; only the engine knows the item is unknown
            codecs.label_from_proto(codecs.pb.AlignmentLabel.FromString(value), dims)


def test_decision_rate_counts_from_the_first_batch_on_the_workers_clock():
    """Three batches: 10 events at t = 100 (the first: its work is before the clock starts),
    20 at 101, 30 at 103 -> 50 events over 3 s; degenerate inputs give NaN, not a number."""
    times = [100.0] * 10 + [101.0] * 20 + [103.0] * 30
    assert decision_rate(times) == pytest.approx(50 / 3)
    assert decision_rate(list(reversed(times))) == pytest.approx(50 / 3)
    assert np.isnan(decision_rate([]))
    assert np.isnan(decision_rate([5.0, 5.0]))


def test_decided_id_at_reads_a_decision_record_of_either_form():
    from service.core.types import Decision
    from service.messages import Outcome

    d = Decision(item_id="i-1", modality="image", accept=False, utility=0.1, uncertainty=0.2,
                 diversity=0.3, coverage_bonus=0.0, margin=0.1, entropy=0.2,
                 least_confidence=0.3, threshold=0.5, model_version=0, reason="skip:below")
    value = codecs.decision_record_to_proto(Outcome(event_id="ev-7", decision=d), 1234.5) \
        .SerializeToString()
    assert decided_id_at(value) == [("ev-7", pytest.approx(1234.5))]
    batch = codecs.decision_records_to_proto([Outcome(event_id=f"ev-{i}", decision=d)
                                              for i in range(3)], 99.0)
    assert decided_id_at(batch[0].SerializeToString()) == [(f"ev-{i}", 99.0) for i in range(3)]


@pytest.mark.slow
def test_the_short_chaos_suite_passes_every_check(tmp_path):
    out = tmp_path / "chaos.md"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.chaos", "--short", "--scenarios",
         "kill,history,poison,broker,broker-restart,grpc", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[chaos")]
    assert proc.returncode == 0, "\n".join(lines[-30:]) + proc.stderr[-3000:]
    report = out.read_text()
    m = re.search(r"\*\*(\d+) of (\d+) checks passed", report)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) >= 20, report
