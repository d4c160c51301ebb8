"""Training the alignment model on acquired pairs.

Recipe, chosen for small budgets where a good learner is worth more than clever selection:

1. **Whitening from unpaired items** (free data): per modality, PCA on *all* items seen so far,
   paired or not, keeping ``pca_dim`` components, each scaled to unit variance (a small floor keeps
   noise directions from being blown up). This is where the unpaired items help.
2. **Closed-form start**: ridge-regularised CCA between the whitened pairs; each canonical
   direction is weighted by ``rho ** weight_power`` so strongly correlated directions dominate the
   cosine similarity.
3. **Optional contrastive fine-tune**: symmetric InfoNCE on the pairs, starting from the CCA heads
   (or from a previous model when warm-starting), for ``finetune_steps`` Adam steps.

Alternative to steps 1-2 (``method="ridge"``): ridge maps from one modality into the other's
top principal directions (PCA on all items), lambda by exact leave-one-out retrieval on the pairs;
far stronger on pretrained-encoder features. By default (``ridge_direction="both"``) both maps are
fitted, ``a -> b`` and ``b -> a``, each into one half of the shared space (the model's two
``blocks``), so a pair scores the mean of both maps' cosines: at or above the plain two-map ridge
baseline at every budget measured (``reports/learner-tuning.md``). ``method="auto"`` (the default)
picks CCA or ridge by cross-validated retrieval on the acquired pairs (:meth:`_model_selection`).

**Self-learning** (``self_learning``, after [Artetxe2017]'s iterative self-learning for bilingual
lexicon induction): the acquired pairs are anchors; the fitted map matches the most recent
*unpaired* items of both modalities, the mutual nearest neighbours under CSLS
([Lample2018]) become pseudo-pairs, ranked by their CSLS score, and the map is refitted on anchors
+ pseudo-pairs, ``self_learning_rounds`` times with a growing share of them. With
``"auto"`` it is kept only when it beats the plain fit in the same cross-validation
on the acquired pairs (the held-out pairs' own items are removed from the unpaired sample first),
so a modality pair whose unpaired structure misleads (drifts into wrong pairs) keeps the plain
map.

The result is composed into one affine head per modality (see :class:`AlignmentModel`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from service.alignment.model import AlignmentModel
from service.core.validation import as_matrix, check_dims


@dataclass(frozen=True)
class TrainerConfig:
    """Hyper-parameters of :class:`AlignmentTrainer` (CCA's tuned on digits; the learner choice
    and ``dim_out`` on seeds 100-104 of every benchmark set, ``reports/learner-tuning.md``)."""

    # 256 = two blocks of 128 (ridge_direction="both"): 128 per map is what pretrained-encoder
    # features need (the ridge map's R@1 on the Bible at 300 pairs: 0.63 / 0.75 / 0.80 at 32 / 64
    # / 128 dimensions); padded with zero columns below that
    dim_out: int = 256
    pca_dim: int = 32  # CCA whitening rank (tuned on digits; independent of dim_out)
    pca_floor: float = 1e-3  # variance floor, relative to the top component
    cca_reg: float = 0.3  # ridge added to each whitened covariance
    weight_power: float = 0.5  # canonical direction weight = rho ** weight_power
    finetune_steps: int = 0
    finetune_lr: float = 1e-3
    finetune_tau: float = 0.1
    min_pairs: int = 4  # below this the model stays the (unaligned) cold start
    # "cca": whitening + ridge CCA (above). "ridge": ridge maps from one modality into the
    # other's top principal directions (both directions by default, see ridge_direction), lambda
    # chosen by exact leave-one-out retrieval on the acquired pairs (:func:`ridge_loo_choice`).
    # "auto": CCA or ridge, whichever cross-validates better on the acquired pairs. Chosen on
    # seeds 100-104 (reports/learner-tuning.md): ridge wins on the real sets, CCA on most toys
    method: str = "auto"
    cv_folds: int = 4  # auto: folds of the acquired pairs
    cca_margin_se: float = 0.0  # auto: CCA must beat ridge by this many standard errors
    # auto: below this many pairs CCA is not a candidate (ridge only). 100: on the emoji
    # image-text set (pool, random pairs, tuning seeds 100-115) the cross-validation picked CCA
    # at 50 pairs too often; ridge only there gave +0.003 R@1 at 50 and 100 pairs (level with the
    # ridge baseline instead of 0.003 below it) and the same curve from 150 pairs
    cca_min_pairs: int = 100
    # "both" (two maps, one per block of the shared space; the mean of their cosines), "auto"
    # (the one with the better leave-one-out retrieval), "a_to_b" or "b_to_a"
    ridge_direction: str = "both"
    ridge_lambdas: tuple[float, ...] = tuple(float(x) for x in np.logspace(-3, 3, 13))
    loo_queries: int = 300  # leave-one-out retrieval: at most this many pairs as queries
    loo_distractors: int = 300  # ... against their partners plus this many unpaired items
    # "auto": kept when cross-validation on the acquired pairs prefers it; "on"; "off".
    # A self-learning fit costs ~1 s at 3000 items (2 cores), ~3 s when the choice is re-run
    self_learning: str = "auto"
    self_learning_rounds: int = 4  # refits; round t keeps the best t/rounds of the pseudo-pairs
    # refits inside the cross-validation that decides whether to self-learn (a cheaper proxy of
    # the final fit: it only has to tell whether the unpaired structure helps)
    self_learning_cv_rounds: int = 2
    # model selection is re-run once the pairs have grown by this factor since the last choice
    # (1.5: the same R@1 as 1.25 at every curve point of the Bible on tuning seeds 100-102, with
    # a third fewer cross-validations)
    reselect_growth: float = 1.5
    # ... and by this factor when self-learning was tried and refused at the last choice (a
    # refusal at few anchors is often reversed soon: re-asking sooner costs one cross-validation).
    # 1.2 against 1.5: +0.14 +- 0.05 R@1 at 100 pairs on the Bible stream (random pairs, the
    # learner knowing only the items seen, tuning seeds 100-107), AUC +11.8 +- 4.5 x1000
    self_learning_recheck_growth: float = 1.2
    # the most recent unpaired items per modality that are matched: the more of both sides of
    # the same pairs it sees, the more true pseudo-pairs (3000: ~0.3 s per matching, 2 cores)
    self_learning_items: int = 3000
    self_learning_min_pairs: int = 20  # fewer anchors: never (the first map is too weak)
    self_learning_margin_se: float = 1.0  # auto: it must win by this many standard errors
    csls_k: int = 10  # neighbourhood size of the CSLS hubness correction
    # the fitted model ranks candidates by CSLS with this neighbourhood (0: by cosine). 10, the
    # self-learning's own k ([Lample2018]'s), not tuned: on tuning seeds 100-105, random pairs,
    # R@1 at 300 pairs rose from 0.107 to 0.115 (emoji) and 0.904 to 0.935 (Bible), with k = 5
    # and 20 within two standard errors of it (reports/retrieval-rule.md)
    retrieval_csls_k: int = 10

    def __post_init__(self):
        for name in ("dim_out", "pca_dim", "min_pairs", "loo_queries", "self_learning_rounds",
                     "self_learning_cv_rounds",
                     "self_learning_items", "csls_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.retrieval_csls_k < 0:
            raise ValueError(f"retrieval_csls_k must be >= 0 (0: plain cosine), got "
                             f"{self.retrieval_csls_k}")
        if self.cca_reg < 0:
            raise ValueError(f"cca_reg must be >= 0, got {self.cca_reg}")
        if self.method not in ("cca", "ridge", "auto"):
            raise ValueError(f"method must be 'cca', 'ridge' or 'auto', got {self.method!r}")
        for name in ("reselect_growth", "self_learning_recheck_growth"):
            if not getattr(self, name) > 1.0:
                raise ValueError(f"{name} must be > 1, got {getattr(self, name)}")
        if self.cca_min_pairs < 0:
            raise ValueError(f"cca_min_pairs must be >= 0, got {self.cca_min_pairs}")
        if self.cv_folds < 2:
            raise ValueError(f"cv_folds must be >= 2, got {self.cv_folds}")
        if self.ridge_direction not in RIDGE_DIRECTIONS:
            raise ValueError(f"ridge_direction must be one of {RIDGE_DIRECTIONS}, got "
                             f"{self.ridge_direction!r}")
        if self.dim_out % self.blocks:
            raise ValueError(f"dim_out must be a multiple of {self.blocks} (one block per ridge "
                             f"map with ridge_direction='both'), got {self.dim_out}")
        if not self.ridge_lambdas or min(self.ridge_lambdas) <= 0:
            raise ValueError(f"ridge_lambdas must be non-empty and > 0, got {self.ridge_lambdas}")
        if self.loo_distractors < 0:
            raise ValueError(f"loo_distractors must be >= 0, got {self.loo_distractors}")
        if self.self_learning not in ("auto", "on", "off"):
            raise ValueError(f"self_learning must be 'auto', 'on' or 'off', got "
                             f"{self.self_learning!r}")

    @property
    def blocks(self) -> int:
        """Separately normalised slices of the shared space (:class:`AlignmentModel`): 2 when the
        ridge learner may fit both maps, else 1."""
        return 2 if self.method != "cca" and self.ridge_direction == "both" else 1

    @property
    def block_dim(self) -> int:
        """Width of one block: ``dim_out // blocks``."""
        return self.dim_out // self.blocks


RIDGE_DIRECTIONS = ("both", "auto", "a_to_b", "b_to_a")


def _whitening(x: np.ndarray, r: int, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """PCA whitening. x: (n, d) -> (mean (d,), W (d, r')) with r' = min(r, d, n)."""
    mu = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mu, full_matrices=False)
    var = s**2 / max(len(x), 1)
    r = max(1, min(r, len(var)))
    top = max(float(var[0]), 1e-12)
    w = vt[:r].T / np.sqrt(var[:r] + floor * top)
    return mu.astype(np.float64), w.astype(np.float64)


def _principal(x: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and top principal directions (unscaled). x: (n, d) -> ((d,), (d, r'))."""
    mu = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mu, full_matrices=False)
    return mu.astype(np.float64), vt[:max(1, min(r, len(vt)))].T.astype(np.float64)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _unit_blocks(z: np.ndarray, blocks: int) -> np.ndarray:
    """:meth:`AlignmentModel.forward`'s normalisation in numpy: each of ``blocks`` equal column
    slices to unit norm, then the whole row. (n, k) -> (n, k)."""
    if blocks > 1:
        z = np.concatenate([_unit(part) for part in np.split(z, blocks, axis=1)], axis=1)
    return _unit(z)


def ridge_loo_choice(x: np.ndarray, y: np.ndarray, lambdas, distractors: np.ndarray,
                     queries: int, rng: np.random.Generator,
                     anchors: int | None = None) -> tuple[float, float, np.ndarray]:
    """Ridge map ``x -> y`` with lambda chosen by exact leave-one-out retrieval.

    For each lambda the leave-one-out prediction of every pair comes in closed form from one SVD
    of ``x`` (``(y_i - h_ii y_hat_i) / (1 - h_ii)`` style: ``r_i / (1 - h_ii)`` residuals). A
    pair scores the reciprocal rank of its true partner, by cosine, among the partners of the
    query pairs plus ``distractors`` (unpaired items of the target modality, already mapped into
    the target space). Nothing outside ``x``, ``y`` and ``distractors`` is looked at.

    Parameters
    ----------
    x : ndarray (n, d)
        Centred source views of the acquired pairs.
    y : ndarray (n, k)
        Their partners in the target space.
    lambdas : sequence of float
    distractors : ndarray (m, k)
    queries : int
        At most this many pairs (a seeded sample) are scored.
    rng : numpy Generator
    anchors : int, optional
        Only the first ``anchors`` rows (the acquired pairs; the rest are self-learning
        pseudo-pairs) are scored as queries. Default: all rows.

    Returns
    -------
    (lambda, leave-one-out mean reciprocal rank, W (d, k)) of the best lambda.
    """
    u, s, vt = _thin_svd(x)
    uty = u.T @ y
    n = len(x) if anchors is None else min(int(anchors), len(x))
    q = np.arange(n) if n <= queries else np.sort(rng.choice(n, queries, replace=False))
    cand = _unit(np.concatenate([y[q], distractors]))
    best = (-1.0, float(lambdas[0]))
    for lam in lambdas:
        f = s**2 / (s**2 + lam)
        h = (u[q] ** 2) @ f
        pred = u[q] @ (f[:, None] * uty)
        loo = y[q] - (y[q] - pred) / np.maximum(1.0 - h, 1e-9)[:, None]
        sims = _unit(loo) @ cand.T
        true = sims[np.arange(len(q)), np.arange(len(q))]
        rank = 1 + (sims > true[:, None]).sum(axis=1)
        mrr = float(np.mean(1.0 / rank))
        if mrr > best[0]:
            best = (mrr, float(lam))
    mrr, lam = best
    w = vt.T @ ((s / (s**2 + lam))[:, None] * uty)
    return lam, mrr, w


def _thin_svd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of a tall x (n, d), n >= 4 d, through the eigendecomposition of the (d, d) Gram
    matrix (several times faster than LAPACK's SVD of the tall matrix, e.g. anchors +
    self-learning pseudo-pairs; singular values below 1e-6 of the largest are dropped, so u stays
    orthonormal). Otherwise LAPACK's SVD (the plain learners' fits stay bit-for-bit as before)."""
    if len(x) < 4 * x.shape[1]:
        return np.linalg.svd(x, full_matrices=False)
    w, v = np.linalg.eigh(x.T @ x)
    keep = w > max(float(w[-1]), 1e-300) * 1e-12
    s = np.sqrt(w[keep])[::-1]
    v = v[:, keep][:, ::-1]
    return (x @ v) / s, s, v.T


def mutual_nearest_pairs(za: np.ndarray, zb: np.ndarray,
                         k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mutual nearest neighbours of two sets of unit vectors under CSLS.

    CSLS ([Lample2018]) is ``2 cos(a, b) - r_a - r_b`` with ``r_x`` the mean cosine of ``x`` to
    its ``k`` nearest neighbours in the other set: it discounts hubs (items close to everything),
    which plain nearest neighbours pair with many partners.

    Parameters
    ----------
    za : ndarray (p, k_dim)
    zb : ndarray (q, k_dim)
        Unit rows in the shared space.
    k : int
        Neighbourhood size of the hubness correction (capped at the set sizes).

    Returns
    -------
    (i (m,), j (m,), score (m,)): row ``i[t]`` of ``za`` and row ``j[t]`` of ``zb`` are each
    other's best CSLS match; ``score[t]`` is that CSLS value. Empty when either set is.
    """
    if len(za) == 0 or len(zb) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    # float32, CSLS built in place in the similarity matrix (no second (p, q) copy); one profiled
    # Bible run spent about as long here as with numpy's partition (~0.3 s per call at 3000 x 3000)
    with torch.inference_mode():
        sims = torch.from_numpy(np.asarray(za, np.float32)) @ torch.from_numpy(
            np.asarray(zb, np.float32)).T
        r_a = sims.topk(min(k, sims.shape[1]), dim=1).values.mean(dim=1)
        r_b = sims.topk(min(k, sims.shape[0]), dim=0).values.mean(dim=0)
        sims.mul_(2).sub_(r_b[None, :])  # row-wise argmax of CSLS ignores r_a
        best_b = sims.argmax(dim=1)
        sims.sub_(r_a[:, None])  # now the CSLS itself
        best_a = sims.argmax(dim=0)
        i = torch.nonzero(best_a[best_b] == torch.arange(len(za))).flatten()
        j = best_b[i]
        score = sims[i, j]
    return i.numpy().astype(np.int64), j.numpy().astype(np.int64), score.numpy().astype(np.float64)


def _reciprocal_ranks(queries: np.ndarray, partners: np.ndarray,
                      distractors: np.ndarray) -> np.ndarray:
    """Reciprocal rank of row i of ``partners`` for query i among all partners and the
    distractors (unit vectors; cosine). Shapes (q, k), (q, k), (m, k) -> (q,)."""
    cand = np.concatenate([partners, distractors])
    sims = queries @ cand.T
    true = sims[np.arange(len(queries)), np.arange(len(queries))]
    return 1.0 / (1 + (sims > true[:, None]).sum(axis=1))


class _Heads:
    """Records ``set_affine`` calls instead of loading them into torch: model selection embeds in
    float64 numpy, so its discrete choice does not depend on torch's thread count (a 1- vs
    2-thread matmul rounds differently and flipped near-tied choices)."""

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks
        self.maps: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def set_affine(self, modality: str, mean: np.ndarray, weight: np.ndarray) -> None:
        self.maps[modality] = (np.asarray(mean, np.float64), np.asarray(weight, np.float64))

    def embed(self, modality: str, x: np.ndarray) -> np.ndarray:
        mean, weight = self.maps[modality]
        return _unit_blocks((x - mean) @ weight, self.blocks)


def _inv_sqrt(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(c)
    return (v / np.sqrt(np.maximum(w, 1e-12))) @ v.T


def cca(ha: np.ndarray, hb: np.ndarray, k: int, reg: float):
    """Ridge CCA. ha: (n, ra), hb: (n, rb) -> (Pa (ra, k'), Pb (rb, k'), rho (k',), means)."""
    ma, mb = ha.mean(0), hb.mean(0)
    a, b = ha - ma, hb - mb
    n = len(a)
    caa = a.T @ a / n + reg * np.eye(a.shape[1])
    cbb = b.T @ b / n + reg * np.eye(b.shape[1])
    cab = a.T @ b / n
    ia, ib = _inv_sqrt(caa), _inv_sqrt(cbb)
    u, rho, vt = np.linalg.svd(ia @ cab @ ib)
    k = min(k, len(rho))
    return ia @ u[:, :k], ib @ vt[:k].T, rho[:k], ma, mb


class AlignmentTrainer:
    """Fits :class:`AlignmentModel` versions from acquired pairs.

    Parameters
    ----------
    dims : mapping of str to int
        Input dimension per modality (exactly two).
    config : TrainerConfig
    seed : int
        Seed of the trainer's own torch generator (fine-tuning order); global RNGs are untouched.
    """

    def __init__(self, dims: dict[str, int], config: TrainerConfig | None = None, seed: int = 0):
        self.dims = check_dims(dims)
        self.modalities = tuple(self.dims)
        self.config = config or TrainerConfig()
        self.seed = int(seed)
        self._whiten: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._pca: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # ridge: mean, top directions
        self._unpaired: dict[str, np.ndarray] = {}  # ridge: a sample of distractors
        self._sl_items: dict[str, np.ndarray] = {}  # self-learning: unpaired items it matches
        self.last_fit: dict = {}  # what the last fit chose (method, direction, lambda, LOO MRR)
        # model selection by cross-validation: (pairs when chosen, method, self-learning?, scores)
        self._choice: tuple | None = None

    # ----------------------------------------------------------------- unpaired data
    def fit_unpaired(self, unpaired: dict[str, np.ndarray]) -> None:
        """Fit the per-modality whitening on unpaired items. unpaired[m]: (n_m, d_m), n_m >= 2,
        oldest first (self-learning matches the last ``self_learning_items`` of them)."""
        for m in self.modalities:
            if m not in unpaired:
                raise ValueError(f"fit_unpaired: missing modality {m!r}")
            x = as_matrix(unpaired[m], self.dims[m], name=f"unpaired[{m!r}]").astype(np.float64)
            if len(x) < 2:
                raise ValueError(f"fit_unpaired: need >= 2 items of {m!r}, got {len(x)}")
            self._whiten[m] = _whitening(x, self.config.pca_dim, self.config.pca_floor)
            if self.config.method != "cca":
                self._pca[m] = _principal(x, self.config.block_dim)
                rng = np.random.default_rng([self.seed, 7])
                keep = min(len(x), self.config.loo_distractors)
                self._unpaired[m] = x[np.sort(rng.choice(len(x), keep, replace=False))]
            if self.config.self_learning != "off":
                # the most recent items: in a stream, partners arrive close together
                self._sl_items[m] = x[-self.config.self_learning_items:]

    def _whitening_for(self, m: str, fallback: np.ndarray):
        if m not in self._whiten:
            self._whiten[m] = _whitening(fallback, self.config.pca_dim, self.config.pca_floor)
        return self._whiten[m]

    # ----------------------------------------------------------------- models
    def cold_model(self) -> AlignmentModel:
        """Version 0: each modality's top principal directions, not aligned with each other.

        Useful for within-modality diversity before any pair exists; cross-modal scores from it
        are meaningless (the selector warms up at random until a trained version arrives).
        """
        model = self.empty_model(0)
        for m in self.modalities:
            if m not in self._whiten:
                raise ValueError("cold_model needs fit_unpaired() first")
            mu, w = self._whiten[m]
            model.set_affine(m, mu, self._same_in_every_block(w))
        return model.eval()

    def empty_model(self, version: int) -> AlignmentModel:
        """An untrained model of this trainer's shape (``dim_out``, ``blocks``)."""
        return AlignmentModel(self.dims, self.config.dim_out, version=version,
                              blocks=self.config.blocks,
                              retrieval_csls_k=self.config.retrieval_csls_k)

    def _same_in_every_block(self, w: np.ndarray) -> np.ndarray:
        """One map (d, k') written into every block: (d, dim_out); the cosines are then that
        map's own."""
        return np.concatenate([_pad(w, self.config.block_dim)] * self.config.blocks, axis=1)

    def fit(self, xa, xb, init: AlignmentModel | None = None) -> AlignmentModel:
        """Train a new version on pairs (row i of ``xa`` with row i of ``xb``).

        Parameters
        ----------
        xa : array-like of shape (n, d_a)
        xb : array-like of shape (n, d_b)
        init : AlignmentModel, optional
            Previous version. Its version number is continued, and when ``finetune_steps > 0`` and
            the CCA start is unavailable (too few pairs) fine-tuning starts from its heads.

        Returns
        -------
        AlignmentModel with ``version = init.version + 1`` (or 1).
        """
        ma, mb = self.modalities
        a = as_matrix(xa, self.dims[ma], name=f"pairs[{ma!r}]").astype(np.float64)
        b = as_matrix(xb, self.dims[mb], name=f"pairs[{mb!r}]").astype(np.float64)
        if len(a) != len(b):
            raise ValueError(f"pairs: {len(a)} rows of {ma!r} but {len(b)} rows of {mb!r}")
        cfg = self.config
        version = (init.version if init is not None else 0) + 1
        mu_a, wa = self._whitening_for(ma, a)
        mu_b, wb = self._whitening_for(mb, b)
        model = self.empty_model(version)
        if len(a) < cfg.min_pairs:
            src = init if init is not None else self.cold_model()
            model.load_state_dict(src.state_dict())
            model.version = version
        else:
            method, self_learn = self._model_selection(a, b, version)
            fit = self._fit_ridge if method == "ridge" else self._fit_cca
            if self_learn:
                info = self._self_learn(fit, model, a, b, version, self._sl_items)
            else:
                info = fit(model, a, b, version)
            self.last_fit = {**info, "pairs": len(a)}
            if self._choice is not None and self._choice[0] <= len(a):
                self.last_fit["chosen_by"] = self._choice[3]
        if cfg.finetune_steps > 0 and len(a) >= 2:
            self._finetune(model, a, b)
        model.n_pairs = len(a)
        return model.eval()

    def _fit_cca(self, model: AlignmentModel | _Heads, a: np.ndarray, b: np.ndarray,
                 version: int, anchors: int | None = None) -> dict:
        """Whitening + ridge CCA (the module docstring's steps 1-2) into ``model``'s heads
        (``anchors``: unused, CCA has no per-pair model selection)."""
        cfg = self.config
        ma, mb = self.modalities
        mu_a, wa = self._whitening_for(ma, a)
        mu_b, wb = self._whitening_for(mb, b)
        ha, hb = (a - mu_a) @ wa, (b - mu_b) @ wb
        pa, pb, rho, ca, cb = cca(ha, hb, cfg.block_dim, cfg.cca_reg)
        scale = np.power(np.clip(rho, 1e-6, None), cfg.weight_power)
        # z = P^T (W^T (x - mu) - c) = (W P)^T (x - mu - W^+ c); fold c into the mean.
        for m, mu, w, p, c in ((ma, mu_a, wa, pa, ca), (mb, mu_b, wb, pb, cb)):
            full = w @ (p * scale)
            shift = np.linalg.lstsq(w.T, c, rcond=None)[0]
            model.set_affine(m, mu + shift, self._same_in_every_block(full))
        return {"method": "cca"}

    def _can_self_learn(self, n: int) -> bool:
        cfg = self.config
        return (cfg.self_learning != "off" and n >= cfg.self_learning_min_pairs
                and all(m in self._sl_items for m in self.modalities))

    def _model_selection(self, a: np.ndarray, b: np.ndarray, version: int) -> tuple[str, bool]:
        """The learner (``method``) and whether to self-learn, for ``n = len(a)`` pairs.

        What the config fixes is used as is; what it leaves to ``"auto"`` is chosen by
        ``cv_folds``-fold cross-validated retrieval on the acquired pairs (:meth:`_cross_validate`).
        The choice is kept until the number of pairs has grown by a quarter (model selection is
        then re-run), so it costs a few fits every so often, not per retrain.
        """
        cfg = self.config
        n = len(a)
        sl_auto = cfg.self_learning == "auto" and self._can_self_learn(n)
        if cfg.method != "auto" and not sl_auto:
            return cfg.method, cfg.self_learning == "on" and self._can_self_learn(n)
        if self._choice is not None:
            n0, method0, sl0, scores0 = self._choice
            refused = not sl0 and any(k.endswith("+self") for k in scores0)
            growth = cfg.self_learning_recheck_growth if refused else cfg.reselect_growth
            if n0 <= n < growth * n0:
                return method0, sl0
        method, self_learn, scores = self._cross_validate(a, b, version, sl_auto)
        if cfg.self_learning == "on":
            self_learn = self._can_self_learn(n)
        self._choice = (n, method, self_learn, scores)
        return method, self_learn

    def _cross_validate(self, a: np.ndarray, b: np.ndarray, version: int,
                        try_self_learning: bool) -> tuple[str, bool, dict]:
        """Model selection on the acquired pairs only.

        Each fold fits the candidates on the other folds' pairs (ridge choosing its own lambda
        and direction inside, by leave-one-out on those pairs only) and scores the held-out
        pairs' mean reciprocal rank in both retrieval directions, the unpaired distractors added
        to the candidates. The learner is CCA or ridge (``method="auto"``): ridge unless CCA is
        better by more than ``cca_margin_se`` standard errors of the paired difference (per
        held-out pair; at small budgets the fold scores are noisy, and ridge is the stronger
        learner on pretrained-encoder features). Self-learning on top of it is then kept only
        when it beats the plain fit by more than ``self_learning_margin_se`` standard errors;
        its unpaired sample loses the held-out pairs' own items first, so their structure
        cannot vouch for it.

        Returns
        -------
        (method, self-learning?, mean reciprocal rank per candidate)
        """
        cfg = self.config
        ma, mb = self.modalities
        n = len(a)
        folds = np.array_split(np.random.default_rng([self.seed, n, 13]).permutation(n),
                               min(cfg.cv_folds, n // 2))
        fits = {"cca": self._fit_cca, "ridge": self._fit_ridge}
        methods = ((("cca", "ridge") if n >= cfg.cca_min_pairs else ("ridge",))
                   if cfg.method == "auto" else (cfg.method,))

        def score(fit, self_learn: bool) -> np.ndarray:
            parts = []
            for held in folds:
                train = np.setdiff1d(np.arange(n), held)
                trial = _Heads(cfg.blocks)
                if self_learn:
                    items = {ma: _without_rows(self._sl_items[ma], a[held]),
                             mb: _without_rows(self._sl_items[mb], b[held])}
                    self._self_learn(fit, trial, a[train], b[train], version, items,
                                     rounds=cfg.self_learning_cv_rounds)
                else:
                    fit(trial, a[train], b[train], version)
                za, zb = trial.embed(ma, a[held]), trial.embed(mb, b[held])
                da = trial.embed(ma, self._distractors(ma, a))
                db = trial.embed(mb, self._distractors(mb, b))
                parts.append(0.5 * (_reciprocal_ranks(za, zb, db)
                                    + _reciprocal_ranks(zb, za, da)))
            return np.concatenate(parts)

        rr = {m: score(fits[m], False) for m in methods}
        method = methods[0]
        if len(methods) == 2:
            method = "cca" if _wins(rr["cca"], rr["ridge"], cfg.cca_margin_se) else "ridge"
        self_learn = False
        if try_self_learning:
            rr[f"{method}+self"] = score(fits[method], True)
            self_learn = _wins(rr[f"{method}+self"], rr[method], cfg.self_learning_margin_se)
        return method, self_learn, {m: round(float(v.mean()), 4) for m, v in rr.items()}

    def _self_learn(self, fit, target: AlignmentModel | _Heads, a: np.ndarray, b: np.ndarray,
                    version: int, items: dict[str, np.ndarray],
                    rounds: int | None = None) -> dict:
        """Fit on the anchors ``(a, b)``, then refit ``self_learning_rounds`` times on anchors +
        the best CSLS mutual-nearest pseudo-pairs among ``items`` (unpaired (p_m, d_m) per
        modality; round t keeps the top t/rounds of them); the last fit goes into ``target``.
        Only the anchors are leave-one-out queries in the ridge's lambda choice."""
        cfg = self.config
        ma, mb = self.modalities
        ua, ub = items[ma], items[mb]
        trial = _Heads(cfg.blocks)
        info = fit(trial, a, b, version)
        kept = 0
        rounds = cfg.self_learning_rounds if rounds is None else rounds
        for t in range(1, rounds + 1):
            i, j, csls = mutual_nearest_pairs(trial.embed(ma, ua), trial.embed(mb, ub),
                                              cfg.csls_k)
            keep = np.argsort(-csls, kind="stable")[:len(i) * t // rounds]
            into: AlignmentModel | _Heads = (target if t == rounds
                                             else _Heads(cfg.blocks))
            info = fit(into, np.concatenate([a, ua[i[keep]]]),
                       np.concatenate([b, ub[j[keep]]]), version, anchors=len(a))
            if isinstance(into, _Heads):
                trial = into
            kept = len(keep)
        return {**info, "pseudo_pairs": kept}

    def _distractors(self, m: str, fallback: np.ndarray) -> np.ndarray:
        if m not in self._unpaired:
            self._unpaired[m] = fallback[:self.config.loo_distractors]
        return self._unpaired[m]

    def _fit_ridge(self, model: AlignmentModel | _Heads, a: np.ndarray, b: np.ndarray,
                   version: int, anchors: int | None = None) -> dict:
        """Ridge maps into the other modality's principal space; see :func:`ridge_loo_choice`.

        A map's target head is the target modality's top ``block_dim`` principal directions
        (fitted on the unpaired items); its source head is the ridge map from the centred source
        into them, lambda by leave-one-out retrieval. ``ridge_direction="both"``: the ``a -> b``
        map fills block 0 of both heads and the ``b -> a`` map block 1 (a pair scores the mean of
        the two cosines); ``"auto"``: both are fitted and the one with the better leave-one-out
        retrieval fills every block. Only the first ``anchors`` pairs (default: all) are
        leave-one-out queries; the rest are self-learning pseudo-pairs.
        """
        cfg = self.config
        ma, mb = self.modalities
        views = {ma: a, mb: b}
        for m in self.modalities:
            if m not in self._pca:  # no fit_unpaired: the pairs themselves
                self._pca[m] = _principal(views[m], cfg.block_dim)
        directions = {"a_to_b": [(ma, mb)], "b_to_a": [(mb, ma)],
                      "auto": [(ma, mb), (mb, ma)], "both": [(ma, mb), (mb, ma)]}
        fitted = []
        for src, tgt in directions[cfg.ridge_direction]:
            mu_s, _ = self._pca[src]
            mu_t, p_t = self._pca[tgt]
            x = views[src] - mu_s
            y = (views[tgt] - mu_t) @ p_t
            dis = (self._distractors(tgt, views[tgt]) - mu_t) @ p_t
            rng = np.random.default_rng([self.seed, version, 11])
            lam, mrr, w = ridge_loo_choice(x, y, cfg.ridge_lambdas, dis, cfg.loo_queries, rng,
                                           anchors)
            fitted.append((mrr, lam, src, tgt, w))
        if cfg.ridge_direction == "both":
            k = cfg.block_dim
            blocks = {m: np.zeros((self.dims[m], cfg.dim_out)) for m in self.modalities}
            for block, (_, _, src, tgt, w) in enumerate(fitted):
                blocks[src][:, block * k:(block + 1) * k] = _pad(w, k)
                blocks[tgt][:, block * k:(block + 1) * k] = _pad(self._pca[tgt][1], k)
            for m in self.modalities:
                model.set_affine(m, self._pca[m][0], blocks[m])
            return {"method": "ridge", "direction": "both",
                    "lambda": [round(f[1], 6) for f in fitted],
                    "loo_mrr": round(float(np.mean([f[0] for f in fitted])), 6)}
        mrr, lam, src, tgt, w = max(fitted, key=lambda f: f[0])  # first of equals: a -> b
        model.set_affine(src, self._pca[src][0], self._same_in_every_block(w))
        model.set_affine(tgt, self._pca[tgt][0], self._same_in_every_block(self._pca[tgt][1]))
        return {"method": "ridge", "direction": f"{src}->{tgt}", "lambda": lam, "loo_mrr": mrr}

    def _finetune(self, model: AlignmentModel, a: np.ndarray, b: np.ndarray) -> None:
        cfg = self.config
        gen = torch.Generator().manual_seed(self.seed + model.version)
        ta, tb = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.finetune_lr)
        ma, mb = model.modalities
        n = len(ta)
        batch = min(n, 256)
        target = torch.arange(batch)
        model.train()
        for _ in range(cfg.finetune_steps):
            idx = torch.randperm(n, generator=gen)[:batch]
            za, zb = model(ma, ta[idx]), model(mb, tb[idx])
            logits = za @ zb.T / cfg.finetune_tau
            loss = (torch.nn.functional.cross_entropy(logits, target)
                    + torch.nn.functional.cross_entropy(logits.T, target)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()


def _wins(challenger: np.ndarray, incumbent: np.ndarray, margin_se: float) -> bool:
    """Whether the paired per-pair scores favour ``challenger`` by more than ``margin_se``
    standard errors of the mean difference (shapes (n,), (n,))."""
    diff = challenger - incumbent
    sem = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else np.inf
    return bool(diff.mean() > margin_se * sem + 1e-12)


def _without_rows(items: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``items`` (p, d) without the rows that equal a row of ``rows`` (r, d) exactly."""
    drop = {r.tobytes() for r in np.ascontiguousarray(rows, dtype=items.dtype)}
    keep = [k for k, r in enumerate(items) if r.tobytes() not in drop]
    return items[keep]


def _pad(w: np.ndarray, k: int) -> np.ndarray:
    """Zero-pad (or cut) the columns of w: (d, k') -> (d, k)."""
    out = np.zeros((w.shape[0], k))
    kk = min(k, w.shape[1])
    out[:, :kk] = w[:, :kk]
    return out
