"""Partner candidates under the model's retrieval rule (``UncertaintyScorer.top_partners``)."""

from __future__ import annotations

import numpy as np
import torch

from service.alignment.model import AlignmentModel
from service.core.scorer import UncertaintyScorer


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _scorer(csls_k: int, zb: np.ndarray, za_seen: np.ndarray) -> UncertaintyScorer:
    model = AlignmentModel({"a": 3, "b": 3}, zb.shape[1], retrieval_csls_k=csls_k)
    sc = UncertaintyScorer(model, index_size=64, device="cpu")
    sc.observe("b", np.zeros((len(zb), 3)), torch.from_numpy(zb), [f"b{i}" for i in
                                                                     range(len(zb))])
    sc.observe("a", np.zeros((len(za_seen), 3)), torch.from_numpy(za_seen))
    return sc


def test_partners_are_ranked_by_csls_over_the_recent_items():
    rng = np.random.default_rng(3)
    zb = _unit(rng.normal(size=(15, 6)))
    za_seen = _unit(rng.normal(size=(40, 6)))
    zq = _unit(rng.normal(size=(4, 6)))
    c, k = 3, 5
    got = _scorer(c, zb, za_seen).top_partners("a", torch.from_numpy(zq), k)
    # spelled out: 2 cos - (query's c best cosines among the candidates, mean) - (candidate's c
    # best cosines among the recent items of the query modality, mean)
    cos = zq.astype(np.float64) @ zb.T
    r_q = np.sort(cos, axis=1)[:, -c:].mean(axis=1)
    r_b = np.sort(zb.astype(np.float64) @ za_seen.T, axis=1)[:, -c:].mean(axis=1)
    csls = 2 * cos - r_q[:, None] - r_b[None, :]
    for row, want in zip(got, np.argsort(-csls, axis=1)[:, :k], strict=True):
        assert [item for item, _ in row] == [f"b{j}" for j in want]
    for i, row in enumerate(got):  # the values shown stay the cosines
        np.testing.assert_allclose([v for _, v in row],
                                   [cos[i, int(item[1:])] for item, _ in row], atol=1e-5)


def test_a_hub_is_ranked_first_by_cosine_and_not_by_csls():
    # b0 is a hub: close to every seen item of modality a and to the query; b1 is the query's
    # own partner, a little less close to it than the hub
    za_seen = _unit(np.array([[1, 0.2, 0], [1, -0.2, 0], [1, 0, 0.2], [1, 0, -0.2]]))
    zb = _unit(np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0, 1]]))
    zq = _unit(np.array([[0.9, 0.3, 0]]))
    assert (zq @ zb.T).argmax() == 0
    assert _scorer(0, zb, za_seen).top_partners("a", torch.from_numpy(zq), 1)[0][0][0] == "b0"
    assert _scorer(2, zb, za_seen).top_partners("a", torch.from_numpy(zq), 1)[0][0][0] == "b1"
