"""The retrieval rule of alignment models: CSLS (``service.alignment.retrieval``)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from service.alignment.evaluate import recall_at_k, retrieval_recall
from service.alignment.model import AlignmentModel
from service.alignment.retrieval import csls_scores
from service.alignment.trainer import AlignmentTrainer, TrainerConfig


def _reference(s: np.ndarray, k: int) -> np.ndarray:
    """CSLS spelled out cell by cell."""
    p, q = s.shape
    out = np.empty_like(s, dtype=np.float64)
    for i in range(p):
        r_i = np.mean(sorted(s[i, :], reverse=True)[:min(k, q)])
        for j in range(q):
            r_j = np.mean(sorted(s[:, j], reverse=True)[:min(k, p)])
            out[i, j] = 2 * s[i, j] - r_i - r_j
    return out


@given(arrays(np.float64, st.tuples(st.integers(1, 7), st.integers(1, 7)),
              elements=st.floats(-1, 1)), st.integers(1, 9))
@settings(max_examples=80, deadline=None)
def test_csls_matches_its_definition(s, k):
    np.testing.assert_allclose(csls_scores(s, k), _reference(s, k), atol=1e-12)


def test_csls_discounts_a_hub():
    # candidate 0 is close to every query (a hub); query 1's true partner is candidate 1, which
    # cosine ranks below the hub and CSLS ranks first
    s = np.array([[0.90, 0.10, 0.20],
                  [0.85, 0.80, 0.10],
                  [0.88, 0.20, 0.70]])
    assert s[1].argmax() == 0
    assert csls_scores(s, 2)[1].argmax() == 1


def test_csls_refuses_bad_input_by_value():
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        csls_scores(np.zeros((2, 2)), 0)
    with pytest.raises(ValueError, match=r"\(p, q\) matrix, got shape \(3,\)"):
        csls_scores(np.zeros(3), 2)
    assert csls_scores(np.zeros((0, 4)), 3).shape == (0, 4)


def test_a_model_ranks_by_its_rule_and_keeps_it_in_its_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    model = AlignmentModel({"a": 6, "b": 5}, 4, version=3, retrieval_csls_k=2)
    za, zb = model.embed("a", rng.normal(size=(9, 6))), model.embed("b", rng.normal(size=(9, 5)))
    np.testing.assert_allclose(model.retrieval_scores(za, zb),
                               csls_scores(za.astype(np.float64) @ zb.T.astype(np.float64), 2))
    model.save(tmp_path)
    assert AlignmentModel.load(tmp_path).retrieval_csls_k == 2
    assert AlignmentModel.from_bytes(model.to_bytes()).retrieval_csls_k == 2
    plain = AlignmentModel({"a": 6, "b": 5}, 4)
    assert plain.retrieval_csls_k == 0  # and a checkpoint from before the rule reads as cosine
    np.testing.assert_allclose(plain.retrieval_scores(za, zb), za @ zb.T, atol=1e-6)
    with pytest.raises(ValueError, match="retrieval_csls_k must be >= 0 .* got -1"):
        AlignmentModel({"a": 6, "b": 5}, 4, retrieval_csls_k=-1)


def test_old_checkpoint_metadata_without_the_rule_loads_as_cosine():
    meta = AlignmentModel({"a": 6, "b": 5}, 4).meta()
    del meta["retrieval_csls_k"]
    assert AlignmentModel.from_meta(meta).retrieval_csls_k == 0


def test_trained_models_carry_the_configured_rule_and_recall_uses_it():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(120, 6)).astype(np.float32)
    b = (a @ rng.normal(size=(6, 5)) + 0.5 * rng.normal(size=(120, 5))).astype(np.float32)
    for k in (0, 10):
        tr = AlignmentTrainer({"a": 6, "b": 5}, TrainerConfig(retrieval_csls_k=k,
                                                               self_learning="off"), seed=0)
        tr.fit_unpaired({"a": a, "b": b})
        model = tr.fit(a[:80], b[:80])
        assert model.retrieval_csls_k == k
        za, zb = model.embed("a", a[80:]), model.embed("b", b[80:])
        assert retrieval_recall(model, a[80:], b[80:]) == recall_at_k(za, zb, csls_k=k)
    with pytest.raises(ValueError, match="retrieval_csls_k must be >= 0"):
        TrainerConfig(retrieval_csls_k=-3)
