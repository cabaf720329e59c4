"""Progress on long waits: a tqdm bar while it lasts (on stderr, as transformers' and datasets' own bars), then one
log line that says what was done and how long it took.

Where: the built-in models' one-time conversion (models.py), data preparation (prepare.py; datasets draws the
tokenizing bars), the held-out evaluations (:class:`EvalSummary`; the Trainer draws their bars) and task scoring
(task.py).
"""

from __future__ import annotations

import logging
import time

from transformers import TrainerCallback

log = logging.getLogger(__name__)


def bar(total: int | None = None, desc: str = "", unit: str = "it"):
    """A tqdm bar that is erased when done (its summary line stays in the log instead); bytes counted in KB/MB/GB."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False, dynamic_ncols=True)


def seconds_since(started: float) -> float:
    return time.perf_counter() - started


class EvalSummary(TrainerCallback):
    """One line per held-out evaluation: its loss, the rows and the seconds it took — the base model's before
    training (train.EvalBeforeTraining, metric prefix "before") and the adapter's during and after training."""

    def __init__(self, rows: int):
        self.rows = rows

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or not state.is_world_process_zero:
            return
        prefix = next((k[:-len("_loss")] for k in metrics if k.endswith("_loss")), None)
        if prefix is None:
            return
        when = "before training (adapter off)" if prefix == "before" else f"at step {state.global_step}"
        log.info("Held-out eval loss %s: %.4f (%d rows, %.1f s)", when, metrics[f"{prefix}_loss"], self.rows,
                 metrics.get(f"{prefix}_runtime", float("nan")))
