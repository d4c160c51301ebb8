"""The learner-tuning script (``scripts/tune_learners.py``) writes its tables from the runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("tune_learners",
                                                  ROOT / "scripts" / "tune_learners.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tuning_report_tabulates_every_learner_mode_and_strategy(tmp_path):
    tl = _script()
    runs = [[[d, learner, seed, mode, strategy], 0.1 + 0.01 * (seed - 100), 0.2]
            for d in tl.DATASETS for learner in tl.LEARNERS for seed in (100, 101)
            for mode in ("pool", "stream") for strategy in ("random", "default")]
    out = tl.write_report(runs, tmp_path / "learner-tuning.md", "cmd")
    text = out.read_text()
    for section in ("## pool, random", "## pool, default", "## stream, random",
                    "## stream, default"):
        assert section in text
    assert text.count("| cca-32 (before) |") == 4
    assert "seeds [100, 101]" in text and "0.105 / 0.200" in text  # mean of 0.11 and 0.10
    assert len(json.loads((tmp_path / "learner-tuning-results.json").read_text())) == len(runs)
    # the default learner of the script is the trainer's default
    from service.alignment import TrainerConfig

    chosen = next(v for k, v in tl.LEARNERS.items() if k.endswith("= default"))
    assert TrainerConfig(**chosen) == TrainerConfig()
