"""The partnerless memory (NO_MATCH answers): its penalty, bounds and re-embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.core.partnerless import PartnerlessMemory


def _unit(x):
    x = torch.as_tensor(np.asarray(x, np.float32))
    return torch.nn.functional.normalize(x, dim=1)


def test_penalty_is_full_for_a_duplicate_zero_beyond_the_radius_and_linear_between():
    mem = PartnerlessMemory(capacity=4, weight=0.5, radius=0.8)
    embed = _unit  # the identity model: raw rows are the embeddings
    assert np.all(mem.penalty(_unit([[1, 0], [0, 1]]), 1, embed) == 0)  # nothing known
    mem.add(np.array([[1.0, 0.0]]))
    cos = np.array([1.0, 0.9, 0.8, 0.0])
    z = _unit(np.stack([cos, np.sqrt(1 - cos ** 2)], axis=1))
    np.testing.assert_allclose(mem.penalty(z, 1, embed), [0.5, 0.25, 0.0, 0.0], atol=1e-6)


def test_capacity_keeps_the_newest_and_a_new_version_re_embeds():
    mem = PartnerlessMemory(capacity=2, weight=1.0, radius=0.5)
    mem.add(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))  # the first is dropped
    assert len(mem) == 2
    assert mem.penalty(_unit([[1.0, 0.0]]), 1, _unit)[0] == 0.0
    calls = []

    def flip(raw):  # another model: a different space
        calls.append(len(raw))
        return _unit(-np.asarray(raw))
    assert mem.penalty(_unit([[1.0, 0.0]]), 2, flip)[0] == pytest.approx(1.0)
    mem.penalty(_unit([[1.0, 0.0]]), 2, flip)
    assert calls == [2]  # embedded once per version


def test_weight_zero_turns_it_off_and_bad_values_are_refused():
    mem = PartnerlessMemory(weight=0.0)
    mem.add(np.ones((1, 3)))
    assert mem.penalty(_unit(np.ones((2, 3))), 1, _unit).tolist() == [0.0, 0.0]
    for kw, msg in (({"capacity": 0}, "capacity must be >= 1"),
                    ({"weight": -1.0}, "weight must be >= 0"),
                    ({"radius": 1.0}, r"radius must be in \[0, 1\)")):
        with pytest.raises(ValueError, match=msg):
            PartnerlessMemory(**kw)
