"""A node's gradients at its own pace: what `--sync async` and `--slow` do to a node's objective.

With asynchronous rounds (README: slow volunteers) a node keeps exchanging at the run's pace and
folds in a new gradient whenever its machine has one: a slow node's rounds carry its latest
gradient, however old, and the tracker still sums every node's latest gradient (DESIGN §2, §3).
Each wrapper is an objective, so the algorithms stay as they are; `fresh` tells the algorithms that
take local steps (D-SGD, SGP, DIMAT, Local-FT) whether the gradient they got is a new one.

- `StaleGradients`: the simulator's slow node. A gradient takes `factor` rounds: the one a round
  gets was started `factor` rounds earlier at that round's parameters.
- `SlowedGradients`: the daemon's `--slowdown`, a machine `factor` times slower per sample: a
  gradient of the full batch takes `factor` times as long (it sleeps the difference), one of a
  smaller batch proportionally less.
- `TimedGradients`: the daemon's gradients in lockstep (`--sync wait`), timed, so every node's DHT
  record says how long its gradients take (`p2pnode status` shows it) whatever the sync mode.
- `BackgroundGradients`: the daemon's asynchronous rounds (timed as well). The gradient runs in its own thread;
  a round waits for it unless `behind()` (an in-neighbour is ahead, this machine's gradients take
  1.5x the other members' or longer, and waiting would add a fifth of a round or more): then it goes
  on with the latest gradient while the computation carries on.

Paced batches (`--pace-batch`, the default of `--sync async`; `--no-pace-batch` turns it off): a slow
node first shrinks its mini-batch until a gradient fits its budget (`paced_batch`; the daemon's budget is the other
members' time plus a tenth of a round, so the node waits for it), but never below what the others'
time buys at its own time per sample (16 // FACTOR, `BackgroundGradients.floor`), and only what that
cannot absorb (fixed costs per gradient, or a batch of one still too slow) is left to late gradients.
A smaller batch is an unbiased estimate of the same local gradient, so the objective and the
tracker's sum are unchanged, and it draws the node's classes in turn (`VisionObjective`), so a few
consecutive small batches cover them as a full one would; a gradient FACTOR rounds late pulls
every node towards where the run was FACTOR rounds ago. Figures: docs/slow-volunteers.md, "A slow node's batch".

A paced node's head start (`BackgroundGradients.start`): P2P-FT starts a paced node's gradient at the value
it sends in its pull phase, so the gradient runs while the round waits for the in-neighbours' values, and
the round takes it after mixing. Its batch aims at the budget plus that head start, and only the rest holds
the round (`round_wait_seconds`). At the fixed point a node's tracker and momentum vanish, so the value it
sends is its mixed parameters and the run stays exact (tests/test_async_exactness.py). A 10x node on the
default model paced to 2-3 samples with it instead of 1 (docs/slow-volunteers.md, "A head start").
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

import torch

from .algorithms.base import Objective

if TYPE_CHECKING:
    from .driver import RoundDriver
    from .settings import NodeSettings

logger = logging.getLogger(__name__)

POLL_S = 0.002  # how often a round waiting for its gradient looks whether a neighbour got ahead
SLOW_RATIO = 1.5  # a machine whose gradients take this many times the other members' (median) is slow


PACE_BAND = (0.8, 1.2)  # a gradient within these multiples of the others' time keeps its batch
WARMUP_GRADIENTS = 3  # a daemon's first gradients carry one-off costs: they never pace the batch
PACE_WINDOW = 5  # gradients timed at one batch size before the next pacing decision (their median counts)
# ... counted in budgets at the full batch: a gradient that took k budgets counts as k gradients (at most a
# window), so a machine whose every gradient spans rounds starts pacing after its third gradient, not its 13th
SLOW_WINDOWS = 2  # windows in a row a machine at the full batch must be slow before it paces (not a passing load)
TIMED_GRADIENTS = 15  # a node's pace is the median time of its last this many gradients
EMULATED_HISTORY = 255  # `--slowdown` sleeps by the median of this many full-batch gradients (a machine's speed)


def paced_batch(batch: int, full: int, seconds: float, target: float) -> int:
    """The next mini-batch for a gradient of `batch` samples that took `seconds`, aiming at `target`
    seconds: between 1 and `full` (--batch-size). Time is taken as proportional to the batch to
    shrink; to grow, the batch also gains at least one sample, because a fixed overhead per gradient
    makes the proportional estimate too timid (it would stay at one sample for good)."""
    if not (seconds > 0 and target > 0):
        return batch
    ratio = target / seconds
    if ratio < 1 / PACE_BAND[1]:
        return max(1, min(batch - 1, int(batch * ratio)))
    if ratio > 1 / PACE_BAND[0]:
        return min(full, max(batch + 1, int(batch * ratio)))
    return batch


def slow_objective(objective: Objective, factor: float, pace_batch: bool) -> Objective:
    """The simulator's node whose gradient of a full batch takes `factor` rounds: with `pace_batch` its
    batch shrinks to fit one round, and only the rest of `factor` (if any) makes its gradients late."""
    if pace_batch:
        full = objective.batch_size
        objective.batch_size = paced_batch(full, full, factor, 1.0)
        factor = factor * objective.batch_size / full
    return StaleGradients(objective, factor) if factor > 1 else objective


def daemon_objective(objective: Objective, settings: NodeSettings, driver: RoundDriver) -> Objective:
    """A daemon's objective as its settings pace it: `--slowdown` emulated, then with `--sync async`
    computed beside the rounds (a round goes on without it when this node is behind; `--pace-batch`
    sizes its batch from the driver's budget), else timed in lockstep."""
    if settings.slowdown > 1:
        objective = SlowedGradients(objective, settings.slowdown)
    if settings.sync == "async":
        budget = driver.gradient_budget if settings.pace_batch else None
        pace = driver.pace if settings.pace_batch else None
        return BackgroundGradients(objective, driver.behind, budget, pace=pace)
    return TimedGradients(objective)  # timed all the same: every member's record says how long gradients take


def unwrapped(objective: Objective) -> Objective:
    """The data-drawing objective under any pace wrappers (its batch order is what checkpoints keep)."""
    while isinstance(objective, ObjectiveWrapper):
        objective = objective.objective
    return objective


class ObjectiveWrapper:
    """Delegates everything but `gradient` to the wrapped objective (its model, data, counters); the base of
    every pace wrapper here and of the benches' experimental ones."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.fresh = True
        self.gradients = 0  # gradients computed

    def __getattr__(self, name: str):
        return getattr(self.objective, name)


class StaleGradients(ObjectiveWrapper):
    def __init__(self, objective: Objective, factor: float) -> None:
        super().__init__(objective)
        self.factor = factor
        self.latest: tuple[torch.Tensor, float] | None = None
        self.started_at: torch.Tensor | None = None  # parameters of the gradient being computed
        self.rounds = 0.0  # rounds it has been computing

    def gradient(self, params: torch.Tensor) -> tuple[torch.Tensor, float]:
        if self.latest is None:  # the first gradient: every node starts with one (tau^0 = g^0)
            self.latest, self.started_at = self.objective.gradient(params), params.clone()
            self.gradients += 1
            return self.latest
        self.rounds += 1
        self.fresh = self.rounds >= self.factor
        if self.fresh:
            self.latest = self.objective.gradient(self.started_at)
            self.gradients += 1
            self.started_at, self.rounds = params.clone(), self.rounds - self.factor
        return self.latest


class SlowedGradients(ObjectiveWrapper):
    """`--slowdown`: a machine `factor` times slower per sample. A gradient of the full batch takes
    `factor` times as long (it sleeps the difference). One of a smaller batch (`--pace-batch`) sleeps
    that difference scaled by its share of the full batch, as on a machine whose gradients take time
    in proportion to the batch (a ViT block); the digits model's own gradient is mostly fixed costs,
    so scaling what it measured would make a smaller batch look no faster. The sleep follows the median
    of the run's full-batch gradients (up to EMULATED_HISTORY), not recent ones: daemons sharing a few
    cores slow each other's gradients for a while, and multiplying that by `factor - 1` made a machine as
    fast as the others look slow. With the last 15, one of three equal nodes in a testnet (`--slow
    0:10,1:10,2:10,3:50 --pace-batch`) paced to 9-15 samples from 18 s into its 70 s run until its
    last second: while it is paced its sleep stays at the loaded figure (a paced batch adds nothing to
    the history)."""

    def __init__(self, objective: Objective, factor: float) -> None:
        super().__init__(objective)
        self.factor = factor
        self.base = unwrapped(objective)
        self.full_batch = self.base.batch_size
        self.full_seconds: deque[float] = deque(maxlen=EMULATED_HISTORY)  # the run's gradients of the full batch

    def gradient(self, params: torch.Tensor) -> tuple[torch.Tensor, float]:
        batch = self.base.batch_size
        started = time.perf_counter()
        result = self.objective.gradient(params)  # counted by the TimedGradients around it
        took = time.perf_counter() - started
        if batch >= self.full_batch or not self.full_seconds:
            self.full_seconds.append(took)
        time.sleep(
            (self.factor - 1) * statistics.median(self.full_seconds) * min(batch, self.full_batch) / self.full_batch
        )
        return result


class TimedGradients(ObjectiveWrapper):
    def __init__(self, objective: Objective) -> None:
        super().__init__(objective)
        self.recent: deque[float] = deque(maxlen=TIMED_GRADIENTS)
        # how long a gradient takes here: the median of the recent ones, so a few slowed by a burst of
        # other work (an evaluation beside the rounds) do not make a machine as fast as the others look slow
        self.seconds: float | None = None

    def _timed_gradient(self, params: torch.Tensor) -> tuple[tuple[torch.Tensor, float], float]:
        """The gradient and the seconds it took (counted into `seconds`)."""
        started = time.perf_counter()
        result = self.objective.gradient(params)
        took = time.perf_counter() - started
        self.recent.append(took)
        self.seconds = statistics.median(self.recent)
        return result, took

    @property
    def round_wait_seconds(self) -> float | None:
        """How long a round waits for this node's gradient."""
        return self.seconds

    def gradient(self, params: torch.Tensor) -> tuple[torch.Tensor, float]:
        result, _ = self._timed_gradient(params)
        self.gradients += 1
        return result


class BackgroundGradients(TimedGradients):
    def __init__(
        self,
        objective: Objective,
        behind: Callable[[], bool],
        budget: Callable[[], float | None] | None = None,
        slow_ratio: float = SLOW_RATIO,
        pace: Callable[[], float | None] | None = None,
    ) -> None:
        """`budget()`: the seconds a gradient may take (None while unknown; the daemon's is the other
        members' time plus a tenth of a round, `RoundDriver.gradient_budget`); given, a gradient that takes
        `slow_ratio` times that or longer shrinks the batch (`paced_batch`). `pace()`: the other members'
        time (`RoundDriver.pace`; the budget if not given), which sets the smallest batch (`floor`)."""
        super().__init__(objective)
        self.behind = behind
        self.budget = budget
        self.pace = pace or budget
        self.slow_ratio = slow_ratio
        self.base = unwrapped(objective)  # the data-drawing objective: its batch is what pacing sets
        self.full_batch = self.base.batch_size
        self.timed = 0.0  # gradients computed so far, counted in budgets (`_spans`)
        self.window: list[float] = []  # seconds of the gradients since the last pacing decision
        self.window_spans = 0.0  # ... counted in budgets
        self.gave_up = False  # a smaller batch took as long as the full one: pacing is off for good
        self.slow_windows = 0  # windows in a row at the full batch that were slow
        self.full_seconds: float | None = None  # the median gradient of the full batch when pacing began
        self.vain_windows = 0  # windows in a row at a smaller batch that took as long as the full batch
        self.lock = threading.Lock()  # the model is shared with evaluation and DIMAT's alignment
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="gradient")
        self.running: Future | None = None
        self.latest: tuple[torch.Tensor, float] | None = None
        self.started_early: float | None = None  # when the running gradient was started by `start` (perf_counter)
        # seconds each recent paced gradient ran before its round asked for it (`start`): time it took off the round
        self.overlaps: deque[float] = deque(maxlen=TIMED_GRADIENTS)

    def _compute(self, params: torch.Tensor) -> tuple[torch.Tensor, float]:
        with self.lock:
            result, took = self._timed_gradient(params)
            self._pace_batch(took)
            return result

    def _pace_batch(self, took: float) -> None:
        """Every PACE_WINDOW gradients (at the full batch counted in budgets, `_spans`; past the first
        few, which carry warm-up costs), compare their median time with the budget: a machine
        `slow_ratio` times over it or more in SLOW_WINDOWS windows in a row shrinks its batch, and a
        paced one moves it towards the budget, never below the batch its full batch's time affords
        in proportion (`floor`: 16 // FACTOR on a FACTOR-times slower machine, the simulator's paced
        batch). Fixed costs per gradient make a batch at the floor take
        longer than the budget; shrinking on from there to 1-2 samples and then giving up had left the
        5x testnet node late gradients of 16 for 81% of its run, where the simulator's 3 fresh samples
        cost 0.1 points and 1 sample 2.1. If the shrink from the full batch bought under a tenth of its
        time in SLOW_WINDOWS windows in a row (fixed costs, not samples, make the machine slow), pacing
        cannot help: back to --batch-size for good, and the gradients come late."""
        budget = target = self.budget() if self.budget is not None else None
        base = self.base
        if target and self.paced:
            target += self.head_start()  # what ran before the round asked cost the round nothing
        warm = self.timed >= WARMUP_GRADIENTS
        spans = self._spans(took, target)
        self.timed += spans
        if not warm or self.gave_up or not target:
            return
        self.window.append(took)
        # only the start of pacing is hurried: once paced, a window is PACE_WINDOW gradients as before
        self.window_spans += spans if base.batch_size == self.full_batch else 1.0
        if self.window_spans < PACE_WINDOW:
            return
        typical = statistics.median(self.window)
        self.window.clear()
        self.window_spans = 0.0
        slow = typical >= self.slow_ratio * target
        if base.batch_size == self.full_batch:
            # in a testnet, machines as fast as the others had single slow windows (an evaluation beside the
            # rounds, 4 daemons on 2 cores) and paced for a while for nothing
            self.slow_windows = self.slow_windows + 1 if slow else 0
            if self.slow_windows < SLOW_WINDOWS:
                return
            self.slow_windows = 0  # counted afresh should it come back to the full batch
            self.full_seconds = typical
        else:
            in_vain = slow and self.full_seconds is not None and typical >= 0.9 * self.full_seconds
            # one window as slow as the full batch is often a loaded one (4 daemons on 2 cores gave one)
            self.vain_windows = self.vain_windows + 1 if in_vain else 0
        if self.vain_windows >= SLOW_WINDOWS:
            logger.warning(
                "gradients of %d sample(s) take %.3f s, those of %d took %.3f s (the aim: %.3f s): fixed costs, "
                "not samples, make this machine slow, so pacing cannot keep up; back to --batch-size %d, its "
                "gradients come late",
                base.batch_size,
                typical,
                self.full_batch,
                self.full_seconds,
                target,
                self.full_batch,
            )
            self.gave_up, base.batch_size = True, self.full_batch
            return
        batch = max(self.floor(), paced_batch(base.batch_size, self.full_batch, typical, target))
        if batch == self.full_batch and paced_batch(base.batch_size, self.full_batch, typical, budget) < batch:
            # only the head start makes room for the full batch: stay paced (started early), else the full
            # batch, computed after mixing, is slow again and paced again (a 2x node cycled so every few windows)
            batch -= 1
        if batch != base.batch_size:
            logger.info("gradients take %.3f s, the aim %.3f s: mini-batch %d", typical, target, batch)
        base.batch_size = batch

    @staticmethod
    def _spans(took: float, target: float | None) -> float:
        """How many gradients `took` seconds count as: one, or as many budgets as it took, up to a window.
        A 50x node's first full batches each took ten rounds; counted one by one, it went on with late
        gradients for 130 rounds before its first pacing decision, and a testnet fell to 74% (87% with
        the decision after its third gradient, one run each)."""
        return min(float(PACE_WINDOW), max(1.0, took / target)) if target else 1.0

    def floor(self) -> int:
        """The smallest batch pacing sets: what the other members' time buys at this machine's full batch's
        time per sample (16 // FACTOR, as in the simulator; the budget's extra tenth of a round bought 4-6
        samples, whose fixed costs made the fast nodes' rounds 1.46x the clean run's)."""
        pace = self.pace() if self.pace is not None else None
        if not (self.full_seconds and pace):
            return 1
        return max(1, min(self.full_batch, int(self.full_batch * pace / self.full_seconds)))

    @property
    def paced(self) -> bool:
        """Whether pacing holds this node's batch below --batch-size."""
        return self.budget is not None and not self.gave_up and self.base.batch_size < self.full_batch

    def head_start(self) -> float:
        """The seconds a paced gradient typically runs before its round asks for it (`start`; 0 if none did)."""
        return statistics.median(self.overlaps) if self.overlaps else 0.0

    @property
    def round_wait_seconds(self) -> float | None:
        """How long a round waits for this node's gradient: its time less what ran before the round asked."""
        if self.seconds is None or not self.paced:
            return self.seconds
        return max(0.0, self.seconds - self.head_start())

    def start(self, params: torch.Tensor) -> None:
        """A paced node starts its next gradient at `params`, the value it sends before mixing (P2P-FT's
        pull), so the gradient runs while the round waits for its in-neighbours' values; the round then
        takes it as its gradient. Only while its batch is paced: a node at the full batch computes at
        the mixed parameters as before."""
        if self.running is None and self.paced:
            self.started_early = time.perf_counter()
            self.running = self.worker.submit(self._compute, params.clone())

    def gradient(self, params: torch.Tensor) -> tuple[torch.Tensor, float]:
        if self.started_early is not None:
            self.overlaps.append(time.perf_counter() - self.started_early)
            self.started_early = None
        if self.running is None:
            self.running = self.worker.submit(self._compute, params.clone())
        while not wait([self.running], timeout=POLL_S).done:
            if self.latest is not None and self.behind():
                self.fresh = False
                return self.latest
        self.latest, self.running, self.fresh = self.running.result(), None, True
        self.gradients += 1
        return self.latest

    def shutdown(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)
