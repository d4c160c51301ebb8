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
    """Hyper-parameters of :class:`AlignmentTrainer` (defaults tuned on the digits two-view set)."""

    dim_out: int = 32
    pca_dim: int = 32
    pca_floor: float = 1e-3  # variance floor, relative to the top component
    cca_reg: float = 0.3  # ridge added to each whitened covariance
    weight_power: float = 0.5  # canonical direction weight = rho ** weight_power
    finetune_steps: int = 0
    finetune_lr: float = 1e-3
    finetune_tau: float = 0.1
    min_pairs: int = 4  # below this the model stays the (unaligned) cold start

    def __post_init__(self):
        for name in ("dim_out", "pca_dim", "min_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cca_reg < 0:
            raise ValueError(f"cca_reg must be >= 0, got {self.cca_reg}")


def _whitening(x: np.ndarray, r: int, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """PCA whitening. x: (n, d) -> (mean (d,), W (d, r')) with r' = min(r, d, n)."""
    mu = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mu, full_matrices=False)
    var = s**2 / max(len(x), 1)
    r = max(1, min(r, len(var)))
    top = max(float(var[0]), 1e-12)
    w = vt[:r].T / np.sqrt(var[:r] + floor * top)
    return mu.astype(np.float64), w.astype(np.float64)


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

    # ----------------------------------------------------------------- unpaired data
    def fit_unpaired(self, unpaired: dict[str, np.ndarray]) -> None:
        """Fit the per-modality whitening on unpaired items. unpaired[m]: (n_m, d_m), n_m >= 2."""
        for m in self.modalities:
            if m not in unpaired:
                raise ValueError(f"fit_unpaired: missing modality {m!r}")
            x = as_matrix(unpaired[m], self.dims[m], name=f"unpaired[{m!r}]").astype(np.float64)
            if len(x) < 2:
                raise ValueError(f"fit_unpaired: need >= 2 items of {m!r}, got {len(x)}")
            self._whiten[m] = _whitening(x, self.config.pca_dim, self.config.pca_floor)

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
        model = AlignmentModel(self.dims, self.config.dim_out, version=0)
        for m in self.modalities:
            if m not in self._whiten:
                raise ValueError("cold_model needs fit_unpaired() first")
            mu, w = self._whiten[m]
            model.set_affine(m, mu, _pad(w, self.config.dim_out))
        return model.eval()

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
        model = AlignmentModel(self.dims, cfg.dim_out, version=version)
        if len(a) < cfg.min_pairs:
            src = init if init is not None else self.cold_model()
            model.load_state_dict(src.state_dict())
            model.version = version
        else:
            ha, hb = (a - mu_a) @ wa, (b - mu_b) @ wb
            pa, pb, rho, ca, cb = cca(ha, hb, cfg.dim_out, cfg.cca_reg)
            scale = np.power(np.clip(rho, 1e-6, None), cfg.weight_power)
            # z = P^T (W^T (x - mu) - c) = (W P)^T (x - mu - W^+ c); fold c into the mean.
            for m, mu, w, p, c in ((ma, mu_a, wa, pa, ca), (mb, mu_b, wb, pb, cb)):
                full = w @ (p * scale)
                shift = np.linalg.lstsq(w.T, c, rcond=None)[0]
                model.set_affine(m, mu + shift, _pad(full, cfg.dim_out))
        if cfg.finetune_steps > 0 and len(a) >= 2:
            self._finetune(model, a, b)
        model.n_pairs = len(a)
        return model.eval()

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


def _pad(w: np.ndarray, k: int) -> np.ndarray:
    """Zero-pad (or cut) the columns of w: (d, k') -> (d, k)."""
    out = np.zeros((w.shape[0], k))
    kk = min(k, w.shape[1])
    out[:, :kk] = w[:, :kk]
    return out
