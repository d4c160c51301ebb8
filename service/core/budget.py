"""Budget controller: decide accept/skip against a running utility threshold, propose then commit.

* **Threshold**: the ``1 - rate`` quantile of the last ``window`` committed utilities (one
  :class:`~service.core.quantile.SlidingQuantile` serves this and the catch-up quantile), so
  about ``rate`` of a stationary stream clears it whatever the utilities' scale.
* **Estimated-spend gate** (pacing): the spend expected so far is ``rate · seen``. Ahead of it by
  more than ``slack`` items, nothing is accepted (``skip:pacing``); behind it by more than
  ``slack``, the catch-up threshold (the ``1 - 2·rate`` quantile) applies instead.
* **Exploration**: each item is, with probability ``explore · rate``, accepted whatever its
  utility (``accept:explore``), so the model keeps seeing what the utility under-rates.
* **Warm-up**: until ``warmup_accepts`` items have been accepted (or fewer than ``min_history``
  utilities were seen), items are accepted at random with probability ``rate`` (cold start: the
  model's scores mean nothing before it has pairs).
* **Random tail**: once ``random_after`` of the ``total`` budget is spent (of a cost budget: the
  selector's ledger says when, :meth:`BudgetDraft.decide_run`'s ``tail``), items are accepted at
  random whatever their utility (``accept:random_tail`` / ``skip:random_tail``), with probability
  ``rate``, or ``2·rate`` while the spend is behind the pacing baseline by more than ``slack``
  (the catch-up rule's counterpart). Utility-driven selection pays at low budgets and costs at
  high ones ([TypiClust]'s phase transition; measured on the real stream in rounds 7-8 of
  ``reports/stream-tuning.md``), so the tuned default spends the first third by utility and the
  rest as a uniform sample of the stream.

``begin()`` returns a :class:`BudgetDraft` that decides item by item on *tentative* counters;
the controller itself changes only in :meth:`BudgetController.commit`, called after the decisions
were published, so a batch that is redelivered (never committed) spends nothing.

Randomness is counter-based (Philox keyed by the seed, counter = items seen), so a redelivered
batch draws the same numbers and no generator state is mutated by proposing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from service.core.quantile import SlidingQuantile
from service.core.reasons import Reason
from service.core.validation import check_fraction

# Random accepts of the tuned stream default before utilities are trusted: the service's
# PAIRSIEVE_WARMUP_ACCEPTS default and the simulator's warm-up (reports/quality.md, "50 random
# warm-up accepts"). BudgetConfig's own default stays 0 for library users, who may warm up with
# labels they already have.
TUNED_WARMUP_ACCEPTS = 50
# Share of the budget spent by utility before the random tail (round 7 of
# reports/stream-tuning.md, tuned on emoji seeds 200-399; confirmed on fresh seeds in round 8).
# The service's PAIRSIEVE_RANDOM_AFTER default and the simulator's; BudgetConfig's own default is
# None (no tail) for library users.
TUNED_RANDOM_AFTER = 1 / 3


def check_random_after(value: float | None) -> None:
    """Raise ``ValueError`` (echoing ``value``) unless it is a share in (0, 1] or None."""
    if value is not None and not 0.0 < value <= 1.0:  # NaN fails too
        raise ValueError(f"random_after must be in (0, 1] or None, got {value!r}")


@dataclass(frozen=True)
class BudgetConfig:
    """Settings of :class:`BudgetController`.

    Attributes
    ----------
    total : int or None
        Absolute budget (acquisitions); None = unlimited.
    target_rate : float
        Target acceptance rate in (0, 1].
    window : int
        Number of recent utilities the threshold quantile is taken over.
    explore : float
        Fraction of the target rate spent on random exploration, in [0, 1].
    warmup_accepts : int
        Accepts made at random before utilities are trusted (cold start).
    min_history : int
        Utilities needed before a threshold exists.
    slack : float
        Items of spend the pacing gate tolerates ahead of / behind the expected spend.
    random_after : float or None
        Share of ``total`` in (0, 1] after which accepts are random (the random tail); None: the
        utility decides to the end. Needs ``total`` (or a cost budget, whose selector says when
        the share is spent: ``BudgetDraft.decide_run(tail=...)``); unlimited: no tail.
    """

    total: int | None = None
    target_rate: float = 0.1
    window: int = 2048
    explore: float = 0.05
    warmup_accepts: int = 0
    min_history: int = 32
    slack: float = 8.0
    random_after: float | None = None

    def __post_init__(self):
        if self.total is not None and self.total < 0:
            raise ValueError(f"budget total must be >= 0 or None, got {self.total}")
        if not (0.0 < self.target_rate <= 1.0):
            raise ValueError(f"target_rate must be in (0, 1], got {self.target_rate!r}")
        check_fraction(self.explore, "explore")
        if self.window < 1 or self.min_history < 1:
            raise ValueError("window and min_history must be >= 1, "
                             f"got {self.window}, {self.min_history}")
        if self.warmup_accepts < 0 or self.slack < 0:
            raise ValueError("warmup_accepts and slack must be >= 0")
        check_random_after(self.random_after)

    @property
    def random_tail_from(self) -> int | None:
        """Spend from which accepts are random (``round(random_after * total)``); None: never."""
        if self.random_after is None or self.total is None:
            return None
        return round(self.random_after * self.total)


@dataclass(frozen=True)
class BudgetDecision:
    """One item's verdict: ``accept``, the ``threshold`` it was held to, and the ``reason``."""

    accept: bool
    threshold: float
    reason: Reason


# Outcome codes of the rule inside decide_run (small ints so every rule is one np.where);
# _REASON_OF[code] is the Reason. The two accept:utility codes differ in their threshold: the
# catch-up-aware one (_ABOVE/_BELOW) or the plain one (everything else).
(_QUOTA, _EXHAUSTED, _PACING, _TAKE_ALL, _WARM_YES, _WARM_NO, _EXPLORE, _ABOVE, _BELOW,
 _TAIL_YES, _TAIL_NO) = range(11)
_REASON_OF = (Reason.SKIP_QUOTA, Reason.SKIP_BUDGET_EXHAUSTED, Reason.SKIP_PACING,
              Reason.ACCEPT_UTILITY, Reason.ACCEPT_WARMUP, Reason.SKIP_WARMUP,
              Reason.ACCEPT_EXPLORE, Reason.ACCEPT_UTILITY, Reason.SKIP_BELOW_THRESHOLD,
              Reason.ACCEPT_RANDOM_TAIL, Reason.SKIP_RANDOM_TAIL)


class BudgetDraft:
    """Tentative, item-by-item decisions for one batch. Never touches the controller."""

    def __init__(self, ctl: BudgetController, n: int):
        self._ctl = ctl
        self.spent = ctl.spent
        self.own_spent = ctl.spent - ctl.external
        self.seen = ctl.seen
        self.accepted = 0
        self.utilities: list[float] = []
        gen = np.random.Generator(np.random.Philox(key=ctl.seed, counter=ctl.seen))
        self._u = gen.random((max(n, 1), 2))
        self._i = 0
        # what the rule needs per item and no decision changes, once per batch (a run slices
        # it): the pacing baseline (exact: integer counts times the rate, as item by item) and
        # the exploration and warm-up draws
        rate = ctl.config.target_rate
        self._expected = rate * (ctl.seen + np.arange(1, len(self._u) + 1))
        self._explore = self._u[:, 0] < ctl.config.explore * rate
        self._warm_yes = self._u[:, 1] < rate  # the random tail's draw too, ...
        self._tail_catch_yes = self._u[:, 1] < 2.0 * rate  # ... at twice the rate when behind
        self._tail_from = ctl.config.random_tail_from
        self._thr = ctl.threshold()
        self._thr_lo = ctl.catch_up_threshold()

    def decide(self, utility: float, tail: bool | None = None) -> BudgetDecision:
        """Decide one item with utility ``utility`` (NaN is rejected); ``tail`` as in
        :meth:`decide_run`.

        A run of one item of :meth:`decide_run`, the one implementation of the decision rule.
        """
        _, accepted, thr, why = self._rule(np.array([utility], dtype=np.float64), None, tail)
        return BudgetDecision(accepted, float(thr[0]), why[0])

    def decide_run(self, utilities: np.ndarray, blocked: np.ndarray | None = None,
                   tail: bool | None = None) -> tuple[int, bool, np.ndarray, list[Reason]]:
        """Decide items in order up to and including the first accept, vectorised.

        The one implementation of the decision rule (:meth:`decide` is a run of one item):
        between two accepts the draft's spend is constant, so every rule is an elementwise test
        over the remaining items, and the first item that passes is the next accept. The caller
        updates later items' utilities after an accept (in-batch diversity) and calls again with
        the rest.

        Parameters
        ----------
        utilities : ndarray of shape (n,)
            Utilities of the remaining items, in arrival order.
        blocked : ndarray of bool, shape (n,), optional
            Items vetoed by a rule outside the budget (a modality quota): ``skip:quota``.
        tail : bool, optional
            Whether the random tail applies, for a budget the controller does not hold (a cost
            budget: the selector's ledger knows when ``random_after`` of it is spent); None:
            the controller's own rule (``random_after · total`` acquisitions spent).

        Returns
        -------
        (decided, accepted, thresholds, reasons)
            ``decided`` items were consumed (the accept is the last of them when ``accepted``);
            ``thresholds`` (decided,) and ``reasons`` are theirs.
        """
        return self._rule(utilities, blocked, tail)

    def _rule(self, utilities, blocked, tail_override=None
              ) -> tuple[int, bool, np.ndarray, list[Reason]]:
        """The decision rule (see :meth:`decide_run`); both entry points call only this."""
        util = np.asarray(utilities, dtype=np.float64)
        n = len(util)
        if n == 0:
            return 0, False, np.zeros(0), []
        if self._i + n > len(self._u):
            raise ValueError(f"draft was begun for {len(self._u)} items; got more")
        if np.isnan(util).any():
            raise ValueError("utility is NaN")
        cfg = self._ctl.config
        rate, thr, thr_lo = cfg.target_rate, self._thr, self._thr_lo
        run = slice(self._i, self._i + n)
        expected = self._expected[run]  # = rate * (self.seen + 1..n): seen = ctl.seen + _i
        blocked = np.zeros(n, dtype=bool) if blocked is None else np.asarray(blocked, dtype=bool)
        open_ = ~blocked & ((self.own_spent - expected) <= cfg.slack)  # not quota, not pacing
        if cfg.total is not None and self.spent >= cfg.total:
            open_[:] = False
        tail = (self._tail_from is not None and self.spent >= self._tail_from
                if tail_override is None else bool(tail_override))
        warm = self.spent < cfg.warmup_accepts or math.isnan(thr)
        behind = expected - self.own_spent > cfg.slack
        catch = behind & (not math.isnan(thr_lo))
        thr_eff = np.where(catch, thr_lo, thr)
        explore, warm_yes = self._explore[run], self._warm_yes[run]
        tail_yes = np.where(behind, self._tail_catch_yes[run], warm_yes)
        if rate >= 1.0:
            ok = open_
        elif tail:
            ok = open_ & tail_yes
        elif warm:
            ok = open_ & warm_yes
        else:
            ok = open_ & (explore | (util >= thr_eff))
        hits = np.flatnonzero(ok)
        accepted = len(hits) > 0
        m = int(hits[0]) + 1 if accepted else n
        # reasons, in precedence order: quota > budget exhausted > pacing > the rest
        codes = np.full(m, _BELOW)
        head = slice(0, m)
        if rate >= 1.0:
            codes[:] = _TAKE_ALL
        elif tail:
            codes[:] = np.where(tail_yes[head], _TAIL_YES, _TAIL_NO)
        elif warm:
            codes[:] = np.where(warm_yes[head], _WARM_YES, _WARM_NO)
        else:
            codes[:] = np.where(explore[head], _EXPLORE,
                                np.where(util[head] >= thr_eff[head], _ABOVE, _BELOW))
        codes[~open_[head]] = _PACING
        if cfg.total is not None and self.spent >= cfg.total:
            codes[:] = _EXHAUSTED
        codes[blocked[head]] = _QUOTA
        thresholds = np.where((codes == _ABOVE) | (codes == _BELOW), thr_eff[head], thr)
        self._i += m
        self.seen += m
        self.utilities.extend(util[head].tolist())
        if accepted:
            self.spent += 1
            self.own_spent += 1
            self.accepted += 1
        return m, accepted, thresholds, [_REASON_OF[c] for c in codes.tolist()]

    def skip(self, utility: float, reason: Reason | str) -> BudgetDecision:
        """Record an item vetoed by a rule outside the budget (e.g. ``Reason.SKIP_QUOTA``)."""
        reason = Reason(reason)  # a code outside the enum is a bug: raise here, not downstream
        if self._i >= len(self._u):
            raise ValueError(f"draft was begun for {len(self._u)} items; got more")
        self._i += 1
        self.seen += 1
        self.utilities.append(float(utility))
        return BudgetDecision(False, self._thr, reason)


class BudgetController:
    """Absolute budget and target acceptance rate. See the module docstring.

    Parameters
    ----------
    config : BudgetConfig
    seed : int
        Key of the counter-based generator used for exploration and warm-up draws.
    """

    def __init__(self, config: BudgetConfig | None = None, seed: int = 0):
        self.config = config or BudgetConfig()
        self.seed = int(seed)
        self.spent = 0
        self.seen = 0
        self.external = 0  # acquisitions by other workers (see record_external)
        rate = self.config.target_rate
        self._q_hi = 1.0 - rate
        self._q_lo = max(0.0, 1.0 - 2.0 * rate)
        self._window = SlidingQuantile(self.config.window)

    @property
    def remaining(self) -> int | None:
        total = self.config.total
        return None if total is None else max(0, total - self.spent)

    def exhausted(self) -> bool:
        return self.config.total is not None and self.spent >= self.config.total

    def threshold(self) -> float:
        """Current utility threshold; NaN until ``min_history`` utilities were committed."""
        return self._window.value(self._q_hi) if len(self._window) >= self.config.min_history \
            else math.nan

    def catch_up_threshold(self) -> float:
        return self._window.value(self._q_lo) if len(self._window) >= self.config.min_history \
            else math.nan

    def acceptance_rate(self) -> float:
        """This worker's accepts / items it decided (external acquisitions excluded)."""
        return (self.spent - self.external) / self.seen if self.seen else 0.0

    def record_external(self, n: int) -> None:
        """Count ``n`` acquisitions made elsewhere (other workers) against the shared budget.

        They raise ``spent`` (and so the exhaustion check) but not the pacing baseline's ``seen``
        share of this worker, which only counts items this worker decided.
        """
        if n < 0:
            raise ValueError(f"external acquisitions must be >= 0, got {n}")
        self.spent += int(n)
        self.external += int(n)

    def begin(self, n: int) -> BudgetDraft:
        """Start deciding a batch of ``n`` items (no state change)."""
        return BudgetDraft(self, n)

    def commit(self, draft: BudgetDraft, accepted: int | None = None) -> None:
        """Apply a draft's decisions after they were published.

        ``accepted`` overrides the draft's accept count (e.g. when some accepts were vetoed
        after the draft, such as by a quota); it may not exceed the draft's count.
        """
        if draft._ctl is not self:
            raise ValueError("draft belongs to another controller")
        if draft.seen - len(draft.utilities) != self.seen:
            raise ValueError("stale draft: the controller was committed since it was begun")
        n_acc = draft.accepted if accepted is None else int(accepted)
        if not 0 <= n_acc <= draft.accepted:
            raise ValueError(f"accepted={accepted} outside [0, {draft.accepted}]")
        total = self.config.total
        # Only this commit's own accepts are checked against the total. The spend already
        # counted may be over it: other workers' selections folded in (record_external) can
        # overshoot by those in flight at that moment (README, Scale-out); a draft then accepts
        # nothing, and its commit must go through (refusing it made the stream adapter
        # dead-letter every later batch of such a worker: the chaos suite's kill-2w run lost
        # 8,193 of 12,000 events that way).
        if total is not None and n_acc and self.spent + n_acc > total:
            raise ValueError(f"commit would spend {self.spent + n_acc} > budget {total} "
                             f"({n_acc} accepts on top of {self.spent} spent)")
        self.spent += n_acc
        self.seen += len(draft.utilities)
        self._window.extend(draft.utilities)
