"""Unit tests for the alignment model, its trainer and retrieval recall (``service.alignment``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.alignment.evaluate import recall_at_k, retrieval_recall
from service.alignment.model import AlignmentModel
from service.alignment.trainer import AlignmentTrainer, TrainerConfig, cca

DIMS = {"a": 10, "b": 8}




@pytest.fixture(scope="module")
def linear_pairs():
    """b = a @ M + small noise: n=300, d_a=10, d_b=8. First 200 rows train, last 100 test."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 10))
    m = rng.standard_normal((10, 8))
    b = a @ m + 0.05 * rng.standard_normal((300, 8))
    return a.astype(np.float32), b.astype(np.float32)


def make_trainer(a, b, **cfg) -> AlignmentTrainer:
    tr = AlignmentTrainer(DIMS, TrainerConfig(**cfg), seed=0)
    tr.fit_unpaired({"a": a, "b": b})
    return tr


# --- recall_at_k -------------------------------------------------------------------------


def test_recall_identity_pairs_is_perfect():
    z = np.eye(6, dtype=np.float32)
    r = recall_at_k(z, z, ks=(1, 5))
    assert r["r1"] == r["r1_ab"] == r["r1_ba"] == 1.0
    assert r["r5"] == 1.0
    assert r["n"] == 6


def test_recall_known_permutation_gives_exact_fraction():
    # za = identity; zb row i is the unit vector of perm[i]. Row i's true partner is zb[i], but
    # za[i] matches zb[j] with perm[j] == i best; the pair is found iff perm[i] == i.
    n = 8
    perm = np.array([0, 1, 2, 4, 3, 6, 7, 5])  # 3 fixed points
    za = np.eye(n, dtype=np.float32)
    zb = np.eye(n, dtype=np.float32)[perm]
    r = recall_at_k(za, zb, ks=(1,))
    assert r["r1_ab"] == pytest.approx(3 / 8)
    assert r["r1_ba"] == pytest.approx(3 / 8)
    assert r["r1"] == pytest.approx(3 / 8)


def test_recall_rank_counts_strictly_higher_scores():
    # Row 0 of zb scores 0.9 with za[0] but za[0]·zb[1] = 1.0 > 0.9: rank 1, so miss at k=1,
    # hit at k=2.
    za = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    zb = np.array([[0.9, 0.0], [1.0, 1.0]], dtype=np.float32)
    r = recall_at_k(za, zb, ks=(1, 2))
    assert r["r1_ab"] == pytest.approx(0.5)  # row 1 (score 1.0 vs 0.0) is found
    assert r["r2_ab"] == pytest.approx(1.0)


def test_recall_r5_at_least_r1():
    rng = np.random.default_rng(1)
    za, zb = rng.standard_normal((40, 4)), rng.standard_normal((40, 4))
    r = recall_at_k(za, zb)
    assert r["r5"] >= r["r1"]
    assert r["r5_ab"] >= r["r1_ab"] and r["r5_ba"] >= r["r1_ba"]


def test_recall_rejects_mismatched_rows():
    with pytest.raises(ValueError, match=r"same non-zero number of rows.*\(4, 3\).*\(5, 3\)"):
        recall_at_k(np.zeros((4, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="same non-zero number of rows"):
        recall_at_k(np.zeros((0, 3)), np.zeros((0, 3)))


# --- trainer: learning -------------------------------------------------------------------


def test_fit_beats_cold_model_and_chance(linear_pairs):
    a, b = linear_pairs
    tr = make_trainer(a, b)
    cold = tr.cold_model()
    assert cold.version == 0
    model = tr.fit(a[:200], b[:200])
    r_cold = retrieval_recall(cold, a[200:], b[200:])["r1"]
    r_fit = retrieval_recall(model, a[200:], b[200:])["r1"]
    chance = 1 / 100
    assert r_fit >= 0.9
    assert r_fit > r_cold + 0.5
    assert r_fit > 20 * chance
    assert model.n_pairs == 200


def test_fit_bumps_version(linear_pairs):
    a, b = linear_pairs
    tr = make_trainer(a, b)
    m1 = tr.fit(a[:50], b[:50])
    assert m1.version == 1
    m2 = tr.fit(a[:60], b[:60], init=m1)
    assert m2.version == 2
    init = AlignmentModel(DIMS, 32, version=41)
    assert tr.fit(a[:60], b[:60], init=init).version == 42


def _states_equal(m1: AlignmentModel, m2: AlignmentModel) -> bool:
    s1, s2 = m1.state_dict(), m2.state_dict()
    return s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_fit_below_min_pairs_keeps_cold_heads(linear_pairs):
    a, b = linear_pairs
    tr = make_trainer(a, b, min_pairs=4)
    model = tr.fit(a[:3], b[:3])
    assert model.version == 1
    assert model.n_pairs == 3
    assert _states_equal(model, tr.cold_model())


def test_fit_below_min_pairs_keeps_init_heads(linear_pairs):
    a, b = linear_pairs
    tr = make_trainer(a, b, min_pairs=10)
    trained = tr.fit(a[:200], b[:200])
    model = tr.fit(a[:5], b[:5], init=trained)
    assert model.version == trained.version + 1
    assert _states_equal(model, trained)
    assert model is not trained


def test_fit_rejects_mismatched_rows(linear_pairs):
    a, b = linear_pairs
    tr = make_trainer(a, b)
    with pytest.raises(ValueError, match=r"pairs: 5 rows of 'a' but 4 rows of 'b'"):
        tr.fit(a[:5], b[:4])


def test_fit_rejects_wrong_dims(linear_pairs):
    a, b = linear_pairs
    tr = make_trainer(a, b)
    with pytest.raises(ValueError, match=r"pairs\['a'\]: wrong dimension 9, expected 10"):
        tr.fit(a[:20, :9], b[:20])
    with pytest.raises(ValueError, match=r"pairs\['b'\]: wrong dimension 10, expected 8"):
        tr.fit(a[:20], a[:20])


def test_fit_rejects_nan(linear_pairs):
    a, b = linear_pairs
    tr = make_trainer(a, b)
    bad = b[:20].copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"pairs\['b'\]: 1 row\(s\) contain NaN or inf "
                                         r"\(first bad row index 7\)"):
        tr.fit(a[:20], bad)


def test_fit_unpaired_validation(linear_pairs):
    a, b = linear_pairs
    tr = AlignmentTrainer(DIMS)
    with pytest.raises(ValueError, match=r"fit_unpaired: missing modality 'b'"):
        tr.fit_unpaired({"a": a})
    with pytest.raises(ValueError, match=r"need >= 2 items of 'a', got 1"):
        tr.fit_unpaired({"a": a[:1], "b": b})
    with pytest.raises(ValueError, match="cold_model needs fit_unpaired"):
        AlignmentTrainer(DIMS).cold_model()


def test_trainer_config_validation():
    with pytest.raises(ValueError, match="pca_dim must be >= 1, got 0"):
        TrainerConfig(pca_dim=0)
    with pytest.raises(ValueError, match="cca_reg must be >= 0, got -0.1"):
        TrainerConfig(cca_reg=-0.1)


# --- CCA ---------------------------------------------------------------------------------


def test_cca_recovers_shared_directions():
    rng = np.random.default_rng(3)
    n = 2000
    shared = rng.standard_normal((n, 3))
    # a: 3 shared + 2 private dims, mixed; b: the 3 shared (noisy) + 3 private dims, mixed.
    ha = np.hstack([shared, rng.standard_normal((n, 2))]) @ rng.standard_normal((5, 5))
    hb = np.hstack([shared + 0.05 * rng.standard_normal((n, 3)),
                    rng.standard_normal((n, 3))]) @ rng.standard_normal((6, 6))
    pa, pb, rho, ma, mb = cca(ha, hb, k=5, reg=1e-4)
    assert pa.shape == (5, 5) and pb.shape == (6, 5) and rho.shape == (5,)
    assert np.all(np.diff(rho) <= 1e-12)  # sorted, strongest first
    assert np.all(rho[:3] > 0.98)
    assert np.all(rho[3:] < 0.15)
    # The canonical variates really are that correlated.
    ua, ub = (ha - ma) @ pa, (hb - mb) @ pb
    for j in range(3):
        assert np.corrcoef(ua[:, j], ub[:, j])[0, 1] == pytest.approx(rho[j], abs=0.01)


def test_cca_caps_k_at_smaller_dimension():
    rng = np.random.default_rng(4)
    pa, pb, rho, *_ = cca(rng.standard_normal((50, 4)), rng.standard_normal((50, 2)), k=10, reg=0.1)
    assert rho.shape == (2,) and pa.shape == (4, 2) and pb.shape == (2, 2)


# --- fine-tuning -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def harder_pairs():
    """Like ``linear_pairs`` but noisier, so CCA-only recall is not saturated at 1."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((300, 10))
    b = a @ rng.standard_normal((10, 8)) + 1.0 * rng.standard_normal((300, 8))
    return a.astype(np.float32), b.astype(np.float32)


@pytest.mark.parametrize("data", ["linear_pairs", "harder_pairs"])
def test_finetune_does_not_collapse(data, request):
    a, b = request.getfixturevalue(data)
    base = make_trainer(a, b).fit(a[:200], b[:200])
    tuned = make_trainer(a, b, finetune_steps=40).fit(a[:200], b[:200])
    r_base = retrieval_recall(base, a[200:], b[200:])["r1"]
    r_tuned = retrieval_recall(tuned, a[200:], b[200:])["r1"]
    assert r_tuned >= 0.8 * r_base
    assert not _states_equal(base, tuned)  # fine-tuning actually changed the heads


def test_finetune_is_seeded_by_trainer_not_global_rng(linear_pairs):
    a, b = linear_pairs
    torch.manual_seed(1)
    m1 = make_trainer(a, b, finetune_steps=10).fit(a[:200], b[:200])
    torch.manual_seed(2)
    m2 = make_trainer(a, b, finetune_steps=10).fit(a[:200], b[:200])
    assert _states_equal(m1, m2)


def test_finetune_draws_nothing_from_global_rng(linear_pairs):
    # Fine-tuning itself must not consume the global torch RNG: fitting with 0 or 10 steps from
    # the same global state leaves the same global state behind.
    a, b = linear_pairs
    after = []
    for steps in (0, 10):
        tr = make_trainer(a, b, finetune_steps=steps)
        torch.manual_seed(123)
        tr.fit(a[:200], b[:200])
        after.append(torch.random.get_rng_state())
    assert torch.equal(after[0], after[1])


def test_fit_leaves_global_torch_rng_untouched(linear_pairs):
    a, b = linear_pairs
    tr = make_trainer(a, b, finetune_steps=5)
    before = torch.random.get_rng_state()
    tr.fit(a[:200], b[:200])
    assert torch.equal(before, torch.random.get_rng_state())


# --- model: checkpoints and embedding ----------------------------------------------------


def test_save_load_round_trip(tmp_path, linear_pairs):
    a, b = linear_pairs
    tr = make_trainer(a, b)
    m1 = tr.fit(a[:100], b[:100])
    m2 = tr.fit(a[:200], b[:200], init=m1)
    p1 = m1.save(tmp_path)
    p2 = m2.save(tmp_path)
    assert p1.name == "model-v000001.pt" and p2.name == "model-v000002.pt"
    assert (tmp_path / "LATEST").read_text().strip() == "model-v000002"
    latest = AlignmentModel.load(tmp_path)
    assert latest.version == 2 and latest.n_pairs == 200
    np.testing.assert_array_equal(latest.embed("a", a[200:]), m2.embed("a", a[200:]))
    np.testing.assert_array_equal(latest.embed("b", b[200:]), m2.embed("b", b[200:]))
    old = AlignmentModel.load(p1)
    assert old.version == 1 and old.n_pairs == 100
    np.testing.assert_array_equal(old.embed("a", a[:10]), m1.embed("a", a[:10]))
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_load_dir_without_latest_raises(tmp_path):
    with pytest.raises(ValueError, match="no LATEST checkpoint in"):
        AlignmentModel.load(tmp_path)


def test_embed_validation():
    model = AlignmentModel(DIMS, 4)
    z = model.embed("a", np.ones((3, 10)))
    assert z.shape == (3, 4) and z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match=r"a: wrong dimension 8, expected 10"):
        model.embed("a", np.ones((3, 8)))
    with pytest.raises(ValueError, match=r"unknown modality 'c'; expected one of \['a', 'b'\]"):
        model.embed("c", np.ones((3, 10)))


def test_model_constructor_validation():
    with pytest.raises(ValueError, match="dim_out must be positive, got 0"):
        AlignmentModel(DIMS, 0)
    with pytest.raises(ValueError, match="exactly two modalities"):
        AlignmentModel({"a": 3}, 2)


def test_set_affine_rejects_wrong_shape():
    model = AlignmentModel(DIMS, 4)
    with pytest.raises(ValueError, match=r"weight for 'a' has shape \(10, 3\), expected \(10, 4\)"):
        model.set_affine("a", np.zeros(10), np.zeros((10, 3)))


def test_dotted_modality_names(tmp_path):
    dims = {"image.clip": 5, "text.v2": 3}
    rng = np.random.default_rng(0)
    xa, xb = rng.standard_normal((50, 5)), rng.standard_normal((50, 3))
    tr = AlignmentTrainer(dims, TrainerConfig(dim_out=4))
    tr.fit_unpaired({"image.clip": xa, "text.v2": xb})
    model = tr.fit(xa, xb)
    assert model.embed("image.clip", xa[:4]).shape == (4, 4)
    assert model.other("image.clip") == "text.v2"
    model.save(tmp_path)
    back = AlignmentModel.load(tmp_path)
    assert back.modalities == ("image.clip", "text.v2")
    np.testing.assert_array_equal(back.embed("text.v2", xb), model.embed("text.v2", xb))


def test_colliding_modality_keys_are_rejected_or_kept_apart():
    try:
        model = AlignmentModel({"x.y": 4, "x_y": 3}, 2)
    except ValueError:
        return  # refusing the ambiguous names is an acceptable behaviour
    assert model.head("x.y").in_features == 4
    assert model.head("x_y").in_features == 3
    assert model.embed("x.y", np.ones((1, 4))).shape == (1, 2)


# --- ridge learner and automatic model selection ----------------------------------------------


def test_ridge_loo_choice_matches_brute_force_leave_one_out():
    from service.alignment.trainer import _unit, ridge_loo_choice

    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 6))
    y = x @ rng.standard_normal((6, 4)) + 0.5 * rng.standard_normal((30, 4))
    dis = rng.standard_normal((10, 4))
    lambdas = (0.01, 1.0, 100.0)

    def brute(lam):  # refit without pair i, predict pair i, rank its partner
        rr = []
        cand = _unit(np.concatenate([y, dis]))
        for i in range(len(x)):
            keep = np.arange(len(x)) != i
            w = np.linalg.solve(x[keep].T @ x[keep] + lam * np.eye(6), x[keep].T @ y[keep])
            s = _unit(x[i:i + 1] @ w) @ cand.T
            rr.append(1.0 / (1 + (s[0] > s[0, i]).sum()))
        return float(np.mean(rr))

    scores = {lam: brute(lam) for lam in lambdas}
    lam, mrr, w = ridge_loo_choice(x, y, lambdas, dis, queries=100,
                                   rng=np.random.default_rng(0))
    assert lam == max(scores, key=scores.get)
    assert mrr == pytest.approx(scores[lam], abs=1e-9)
    np.testing.assert_allclose(w, np.linalg.solve(x.T @ x + lam * np.eye(6), x.T @ y), atol=1e-8)


def test_ridge_learner_picks_the_direction_that_generalises(linear_pairs):
    # b is a noisy linear function of a (10 -> 8): mapping a into b's space is the right
    # direction; the choice is made on the training pairs only (leave-one-out)
    a, b = linear_pairs
    tr = make_trainer(a[:200], b[:200], method="ridge", dim_out=8, ridge_direction="auto")
    model = tr.fit(a[:120], b[:120])
    assert tr.last_fit["method"] == "ridge" and tr.last_fit["direction"] == "a->b"
    assert tr.last_fit["lambda"] in TrainerConfig().ridge_lambdas
    assert retrieval_recall(model, a[200:], b[200:])["r1"] > 0.9
    forced = make_trainer(a[:200], b[:200], method="ridge", dim_out=8, ridge_direction="b_to_a")
    forced.fit(a[:120], b[:120])
    assert forced.last_fit["direction"] == "b->a"


def test_auto_learner_chooses_by_cross_validation_on_the_pairs_only(linear_pairs):
    a, b = linear_pairs
    tr = make_trainer(a[:200], b[:200], method="auto", dim_out=8)
    m1 = tr.fit(a[:100], b[:100])
    info = tr.last_fit
    assert info["method"] in ("cca", "ridge") and {"cca", "ridge"} <= set(info["chosen_by"])
    # same pairs, same trainer state -> the same model, whatever else exists (no other input)
    tr2 = make_trainer(a[:200], b[:200], method="auto", dim_out=8)
    m2 = tr2.fit(a[:100], b[:100])
    for m in ("a", "b"):
        np.testing.assert_array_equal(m1.embed(m, (a if m == "a" else b)[200:]),
                                      m2.embed(m, (a if m == "a" else b)[200:]))
    # the choice is kept until the pairs grow by reselect_growth (1.5), or by
    # self_learning_recheck_growth (1.2) when self-learning was tried and refused, then re-made
    cfg = TrainerConfig()
    assert (cfg.reselect_growth, cfg.self_learning_recheck_growth) == (1.5, 1.2)
    refused = not tr._choice[2] and any(k.endswith("+self") for k in tr._choice[3])
    growth = 1.2 if refused else 1.5
    tr.fit(a[:int(100 * growth) - 1], b[:int(100 * growth) - 1])
    assert tr._choice[0] == 100
    tr.fit(a[:int(100 * growth)], b[:int(100 * growth)])
    assert tr._choice[0] == int(100 * growth)


def test_a_refused_self_learning_is_asked_again_sooner(linear_pairs):
    a, b = linear_pairs
    tr = make_trainer(a[:200], b[:200], method="ridge", dim_out=8)
    tr._choice = (100, "ridge", False, {"ridge": 0.5, "ridge+self": 0.4})  # tried, refused
    tr.fit(a[:119], b[:119])
    assert tr._choice[0] == 100
    tr.fit(a[:120], b[:120])
    assert tr._choice[0] == 120
    tr._choice = (100, "ridge", True, {"ridge": 0.4, "ridge+self": 0.5})  # tried, kept
    tr.fit(a[:149], b[:149])
    assert tr._choice[0] == 100


def test_cca_is_no_candidate_below_cca_min_pairs(linear_pairs):
    a, b = linear_pairs
    tr = make_trainer(a[:200], b[:200], method="auto", dim_out=8, self_learning="off")
    tr.fit(a[:99], b[:99])
    assert set(tr.last_fit["chosen_by"]) == {"ridge"} and tr.last_fit["method"] == "ridge"
    tr = make_trainer(a[:200], b[:200], method="auto", dim_out=8, self_learning="off")
    tr.fit(a[:100], b[:100])
    assert {"cca", "ridge"} <= set(tr.last_fit["chosen_by"])
    with pytest.raises(ValueError, match="cca_min_pairs must be >= 0, got -1"):
        TrainerConfig(cca_min_pairs=-1)
    with pytest.raises(ValueError, match="self_learning_recheck_growth must be > 1, got 1.0"):
        TrainerConfig(self_learning_recheck_growth=1.0)


def test_auto_learner_picks_ridge_on_real_text_and_cca_on_digits():
    from service.evaluation.datasets import get_dataset

    picks = {}
    for name in ("bible-en-es", "digits"):
        ds = get_dataset(name)
        p = np.random.default_rng(100).permutation(len(ds.a))  # not a report seed
        tr = AlignmentTrainer({ds.modality_a: ds.a.shape[1], ds.modality_b: ds.b.shape[1]},
                              TrainerConfig(method="auto", dim_out=64), seed=0)
        tr.fit_unpaired({ds.modality_a: ds.a[p[:1500]], ds.modality_b: ds.b[p[:1500]]})
        tr.fit(ds.a[p[:300]], ds.b[p[:300]])
        picks[name] = tr.last_fit["method"]
    assert picks == {"bible-en-es": "ridge", "digits": "cca"}


def test_blocked_model_scores_the_mean_of_the_block_cosines():
    # blocks=2: each half normalised on its own, so cos(z_a, z_b) = mean of the halves' cosines
    rng = np.random.default_rng(3)
    model = AlignmentModel({"a": 5, "b": 4}, 6, blocks=2)
    wa, wb = rng.standard_normal((5, 6)), rng.standard_normal((4, 6))
    model.set_affine("a", np.zeros(5), wa)
    model.set_affine("b", np.zeros(4), wb)
    xa, xb = rng.standard_normal((7, 5)), rng.standard_normal((9, 4))
    za, zb = model.embed("a", xa), model.embed("b", xb)
    np.testing.assert_allclose(np.linalg.norm(za, axis=1), 1, atol=1e-6)

    def cos(x, y):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        y = y / np.linalg.norm(y, axis=1, keepdims=True)
        return x @ y.T

    ha, hb = xa @ wa, xb @ wb
    want = 0.5 * (cos(ha[:, :3], hb[:, :3]) + cos(ha[:, 3:], hb[:, 3:]))
    np.testing.assert_allclose(za @ zb.T, want, atol=1e-5)
    with pytest.raises(ValueError, match="blocks must be >= 1 and divide dim_out = 6, got 4"):
        AlignmentModel({"a": 5, "b": 4}, 6, blocks=4)


def test_blocks_survive_a_checkpoint(tmp_path, linear_pairs):
    a, b = linear_pairs
    tr = make_trainer(a[:200], b[:200], method="ridge", dim_out=8)
    model = tr.fit(a[:100], b[:100])
    assert model.blocks == 2 and tr.last_fit["direction"] == "both"
    model.save(tmp_path)
    back = AlignmentModel.load(tmp_path)
    assert back.blocks == 2
    np.testing.assert_array_equal(back.embed("a", a[200:]), model.embed("a", a[200:]))


def test_two_way_ridge_is_the_mean_of_both_one_way_maps(linear_pairs):
    # ridge_direction="both": block 0 is the a->b map, block 1 the b->a map, so a pair's score is
    # the mean of the scores each one-way learner gives it (same lambdas: same pairs, same LOO;
    # a one-way learner of dim_out 4 has the same 4 principal directions as one block of 8)
    a, b = linear_pairs
    kw = {"method": "ridge", "self_learning": "off"}
    both = make_trainer(a[:200], b[:200], dim_out=8, **kw).fit(a[:60], b[:60])
    ab = make_trainer(a[:200], b[:200], dim_out=4, ridge_direction="a_to_b", **kw).fit(a[:60],
                                                                                      b[:60])
    ba = make_trainer(a[:200], b[:200], dim_out=4, ridge_direction="b_to_a", **kw).fit(a[:60],
                                                                                      b[:60])
    ta, tb = a[200:], b[200:]
    want = 0.5 * (ab.embed("a", ta) @ ab.embed("b", tb).T + ba.embed("a", ta) @ ba.embed("b", tb).T)
    np.testing.assert_allclose(both.embed("a", ta) @ both.embed("b", tb).T, want, atol=1e-5)


def test_odd_dim_out_with_two_maps_is_refused():
    with pytest.raises(ValueError, match="dim_out must be a multiple of 2 .* got 7"):
        TrainerConfig(dim_out=7)
    assert TrainerConfig(dim_out=7, method="cca").blocks == 1


@pytest.mark.parametrize("name", ["bible-en-es", "emoji-image-name"])
def test_learner_at_or_above_the_ridge_baseline_on_real_sets(name):
    """Issue 13's bar on the committed real sets: random pairs, the default learner (without
    self-learning, which only adds on the Bible) against the plain two-map ridge baseline, at
    200 and 300 pairs; tuning seed 100 (not a report seed). Mean R@1 of the two budgets, within
    0.005 (one hit in 200 among 500 held-out pairs) or above."""
    from service.evaluation.datasets import get_dataset
    from service.evaluation.ridge_baseline import RidgeBaseline, recall_from_scores
    from service.evaluation.simulator import SimConfig, _split

    ds = get_dataset(name)
    test, pool = _split(ds, SimConfig(seed=100), np.random.default_rng(100))
    dims = {ds.modality_a: ds.a.shape[1], ds.modality_b: ds.b.shape[1]}
    tr = AlignmentTrainer(dims, TrainerConfig(self_learning="off"), seed=100)
    tr.fit_unpaired({ds.modality_a: ds.a[pool], ds.modality_b: ds.b[pool]})
    ours, base = [], []
    for n in (200, 300):
        a, b = ds.a[pool[:n]], ds.b[pool[:n]]
        ours.append(retrieval_recall(tr.fit(a, b), ds.a[test], ds.b[test])["r1"])
        base.append(recall_from_scores(RidgeBaseline(a, b).scores(ds.a[test], ds.b[test]))["r1"])
    assert np.mean(ours) >= np.mean(base) - 0.005, (ours, base)


@pytest.mark.parametrize(("kw", "msg"), [
    ({"method": "svm"}, "method must be 'cca', 'ridge' or 'auto', got 'svm'"),
    ({"ridge_direction": "up"}, "ridge_direction must be"),
    ({"ridge_lambdas": ()}, "ridge_lambdas must be non-empty and > 0"),
    ({"ridge_lambdas": (1.0, -1.0)}, "ridge_lambdas must be non-empty and > 0"),
    ({"cv_folds": 1}, "cv_folds must be >= 2, got 1"),
    ({"reselect_growth": 1.0}, "reselect_growth must be > 1, got 1.0"),
    ({"self_learning_cv_rounds": 0}, "self_learning_cv_rounds must be >= 1, got 0"),
    ({"loo_distractors": -1}, "loo_distractors must be >= 0, got -1"),
])
def test_learner_config_errors_name_the_value(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainerConfig(**kw)


def test_auto_choice_does_not_depend_on_torch_threads(linear_pairs):
    """Model selection embeds in float64 numpy: a 1- vs 2-thread torch matmul rounds
    differently, and once flipped a near-tied CCA/ridge choice (and the whole curve after it)."""
    a, b = linear_pairs
    old = torch.get_num_threads()
    choices = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            tr = make_trainer(a[:200], b[:200], method="auto", dim_out=8)
            tr.fit(a[:40], b[:40])
            choices.append(tr._choice)
    finally:
        torch.set_num_threads(old)
    assert choices[0] == choices[1] == choices[2]


# --- self-learning --------------------------------------------------------------------------


def test_thin_svd_matches_lapack_and_drops_null_directions():
    from service.alignment.trainer import _thin_svd

    x = np.random.default_rng(1).standard_normal((200, 12))  # n >= 4 d: the Gram path
    u, s, vt = _thin_svd(x)
    np.testing.assert_allclose(s, np.linalg.svd(x, compute_uv=False), rtol=1e-10)
    np.testing.assert_allclose((u * s) @ vt, x, atol=1e-10)
    np.testing.assert_allclose(u.T @ u, np.eye(12), atol=1e-10)
    low_rank = np.repeat(x[:, :4], 3, axis=1)  # rank 4 in 12 columns
    u, s, vt = _thin_svd(low_rank)
    assert len(s) == 4
    np.testing.assert_allclose((u * s) @ vt, low_rank, atol=1e-9)


def test_mutual_nearest_pairs_recovers_a_shuffled_pairing():
    from service.alignment.trainer import _unit, mutual_nearest_pairs

    rng = np.random.default_rng(2)
    za = _unit(rng.standard_normal((50, 16)))
    perm = rng.permutation(50)
    zb = _unit(za[perm] + 0.01 * rng.standard_normal((50, 16)))  # zb[t] ~ za[perm[t]]
    i, j, score = mutual_nearest_pairs(za, zb, k=5)
    assert len(i) == 50
    np.testing.assert_array_equal(perm[j], i)
    assert score.shape == (50,) and np.isfinite(score).all()
    e = mutual_nearest_pairs(za[:0], zb, k=5)
    assert all(len(v) == 0 for v in e)


def test_mutual_nearest_pairs_are_one_to_one_even_with_a_hub():
    """A b item close to every a item (a hub) is the plain nearest neighbour of many; mutual
    pairs use every item at most once, the hub included."""
    from service.alignment.trainer import _unit, mutual_nearest_pairs

    rng = np.random.default_rng(3)
    za = _unit(rng.standard_normal((30, 8)) + 3.0)  # all in one cone
    zb = np.concatenate([_unit(za + 0.2 * rng.standard_normal((30, 8))),
                         _unit(za.mean(axis=0, keepdims=True))])  # row 30: the hub
    assert (np.argmax(za @ zb.T, axis=1) == 30).sum() >= 10
    i, j, _ = mutual_nearest_pairs(za, zb, k=5)
    assert len(i) > 0
    assert len(set(i.tolist())) == len(i) and len(set(j.tolist())) == len(j)


LATENT_DIMS = {"a": 40, "b": 30}


def _latent_pairs(n, seed, noise=1.0):
    """Two noisy linear views (d_a=40, d_b=30) of one 20-d latent: 25 anchors leave the ridge
    map short of what the unpaired structure can teach it."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 20))
    a = z @ rng.standard_normal((20, 40)) + noise * rng.standard_normal((n, 40))
    b = z @ rng.standard_normal((20, 30)) + noise * rng.standard_normal((n, 30))
    return a.astype(np.float32), b.astype(np.float32)


def test_self_learning_from_unpaired_items_beats_the_anchors_alone():
    a, b = _latent_pairs(1400, seed=4)
    pool, test = slice(0, 1200), slice(1200, 1400)
    rng = np.random.default_rng(5)
    # each modality's unpaired items in its own order: nothing aligns them but the model
    unpaired = {"a": a[pool][rng.permutation(1200)], "b": b[pool][rng.permutation(1200)]}
    r1 = {}
    for mode in ("off", "on"):
        tr = AlignmentTrainer(LATENT_DIMS, TrainerConfig(method="ridge", dim_out=16,
                                                         self_learning=mode,
                                                         self_learning_min_pairs=10), seed=0)
        tr.fit_unpaired(unpaired)
        model = tr.fit(a[:25], b[:25])
        r1[mode] = retrieval_recall(model, a[test], b[test])["r1"]
        assert ("pseudo_pairs" in tr.last_fit) == (mode == "on")
    assert r1["on"] > r1["off"] + 0.05, r1


def test_auto_self_learning_is_refused_when_the_unpaired_items_mislead():
    """Unpaired b items from another latent (none is a partner of an a item): their mutual
    nearest neighbours are wrong pairs, and the cross-validation on the acquired pairs alone
    must keep the plain map."""
    a, b = _latent_pairs(1200, seed=6)
    _, b_other = _latent_pairs(1000, seed=7)
    tr = AlignmentTrainer(LATENT_DIMS, TrainerConfig(method="ridge", dim_out=16,
                                                     self_learning="auto",
                                                     self_learning_min_pairs=10), seed=0)
    tr.fit_unpaired({"a": a[200:], "b": b_other})
    tr.fit(a[:60], b[:60])
    assert tr._choice is not None and tr._choice[2] is False
    assert "pseudo_pairs" not in tr.last_fit
    assert set(tr.last_fit["chosen_by"]) == {"ridge", "ridge+self"}


def test_auto_self_learning_is_chosen_when_it_generalises():
    a, b = _latent_pairs(1400, seed=4)
    rng = np.random.default_rng(5)
    tr = AlignmentTrainer(LATENT_DIMS, TrainerConfig(method="ridge", dim_out=16,
                                                     self_learning="auto",
                                                     self_learning_min_pairs=10), seed=0)
    tr.fit_unpaired({"a": a[:1200][rng.permutation(1200)], "b": b[:1200][rng.permutation(1200)]})
    tr.fit(a[:25], b[:25])
    assert tr._choice[2] is True and tr.last_fit["pseudo_pairs"] > 0


def test_cross_validated_self_learning_drops_the_held_out_pairs_items():
    from service.alignment.trainer import _without_rows

    items = np.arange(20, dtype=np.float64).reshape(10, 2)
    kept = _without_rows(items, items[[1, 4]].astype(np.float32))
    assert len(kept) == 8 and not any((kept == items[1]).all(axis=1))


def test_self_learning_below_its_minimum_of_anchors_is_off(linear_pairs):
    a, b = linear_pairs
    tr = make_trainer(a[:200], b[:200], method="ridge", dim_out=8, self_learning="on",
                      self_learning_min_pairs=50)
    tr.fit(a[:30], b[:30])
    assert "pseudo_pairs" not in tr.last_fit
    tr.fit(a[:60], b[:60])
    assert tr.last_fit["pseudo_pairs"] >= 0


def test_ridge_loo_queries_only_the_anchors():
    from service.alignment.trainer import ridge_loo_choice

    rng = np.random.default_rng(8)
    x = rng.standard_normal((80, 5))
    y = x @ rng.standard_normal((5, 4))
    lambdas = (0.1, 1.0)
    full = ridge_loo_choice(x, y, lambdas, np.zeros((0, 4)), 300, np.random.default_rng(0))
    same = ridge_loo_choice(x, y, lambdas, np.zeros((0, 4)), 300, np.random.default_rng(0),
                            anchors=80)
    assert full[:2] == same[:2]
    # rows past the anchors with garbage targets: fitted on, never scored as queries
    y2 = np.concatenate([y, rng.standard_normal((40, 4)) * 10])
    x2 = np.concatenate([x, rng.standard_normal((40, 5))])
    scored_all = ridge_loo_choice(x2, y2, lambdas, np.zeros((0, 4)), 300,
                                  np.random.default_rng(0))[1]
    scored_anchors = ridge_loo_choice(x2, y2, lambdas, np.zeros((0, 4)), 300,
                                      np.random.default_rng(0), anchors=80)[1]
    assert scored_anchors != scored_all


@pytest.mark.parametrize(("kw", "msg"), [
    ({"self_learning": "yes"}, "self_learning must be 'auto', 'on' or 'off', got 'yes'"),
    ({"self_learning_rounds": 0}, "self_learning_rounds must be >= 1, got 0"),
    ({"self_learning_items": 0}, "self_learning_items must be >= 1, got 0"),
    ({"csls_k": 0}, "csls_k must be >= 1, got 0"),
])
def test_self_learning_config_errors_name_the_value(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainerConfig(**kw)
