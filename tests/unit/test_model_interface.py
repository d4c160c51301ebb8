"""The core's model interface and the checkpoint module kept outside the core."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from service.alignment.checkpoint import checkpoint_stem, load_checkpoint, resolve_checkpoint
from service.alignment.model import AlignmentModel
from service.core.cross_modal_model import CrossModalModel
from service.core.selector import StreamingSelector


def test_alignment_model_satisfies_the_core_interface():
    model = AlignmentModel({"a": 4, "b": 3}, dim_out=2, version=5)
    assert isinstance(model, CrossModalModel)
    assert model.to("cpu") is model and model.eval() is model
    z = model("a", torch.ones(2, 4))
    assert tuple(z.shape) == (2, 2)
    assert model.embed("b", np.ones((3, 3))).shape == (3, 2)


def test_core_runs_on_any_model_of_the_interface():
    """A minimal non-nn.Module model (no checkpoint code anywhere) drives the selector."""

    class Fixed:
        dims = {"x": 3, "y": 2}
        modalities = ("x", "y")
        dim_out = 2
        version = 0

        def other(self, m):
            return "y" if m == "x" else "x"

        def __call__(self, m, x):
            return torch.nn.functional.normalize(x[:, :2], dim=1)

        def embed(self, m, x):
            return self(m, torch.as_tensor(np.asarray(x, np.float32))).numpy()

        def to(self, device):
            return self

        def eval(self):
            return self

    from service.core.types import FeatureItem

    assert isinstance(Fixed(), CrossModalModel)
    sel = StreamingSelector(Fixed(), device="cpu")
    rng = np.random.default_rng(0)
    items = [FeatureItem(f"i{j}", "x" if j % 2 else "y",
                         rng.normal(size=3 if j % 2 else 2).astype(np.float32)) for j in range(8)]
    prop = sel.propose(items)
    sel.commit(prop)
    assert len(prop.decisions) == 8


def test_checkpoint_files_and_latest(tmp_path):
    model = AlignmentModel({"a": 4, "b": 3}, dim_out=2, version=7)
    model.n_pairs = 12
    path = model.save(tmp_path)
    assert path.name == checkpoint_stem(7) + ".pt" == "model-v000007.pt"
    assert (tmp_path / "LATEST").read_text().strip() == "model-v000007"
    assert json.loads((tmp_path / "model-v000007.json").read_text()) == model.meta()
    assert resolve_checkpoint(tmp_path) == path
    back = load_checkpoint(tmp_path, AlignmentModel.from_meta)
    assert (back.version, back.n_pairs, back.dims, back.training) == (7, 12, model.dims, False)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    assert not list(tmp_path.glob(".*.tmp"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no LATEST checkpoint in"):
        resolve_checkpoint(tmp_path / "empty")
