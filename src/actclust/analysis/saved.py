"""What a fitted state's analyses keep with a saved run, so that a loaded run does not build them again.

The approximate search indexes go beside the run as files (memory-mapped at load); trust's calibration
on the run's own split, and the thresholds of its chips, go into the run's manifest and array file. The run's writer and reader
(:mod:`actclust.io.persistence`) take both as plain data and callbacks from here: they import no analysis.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..exceptions import InvalidSaveError
from .retrieval import attach_saved_indexes, saved_index_files

if TYPE_CHECKING:
    from ..state import FittedState

__all__ = ["kept", "RESTORE", "saved_index_files", "attach_saved_indexes"]


def _restore_thresholds(state: FittedState, arrays: dict, value) -> None:
    """Put back the trust-chip thresholds, checked: a false-alarm rate in (0, 1) and a finite number per signal."""
    rate, signals = float(value["false_alarm_rate"]), {str(k): float(v) for k, v in value["signals"].items()}
    if not 0 < rate < 1:
        raise InvalidSaveError(f"a false-alarm rate of {rate}, out of range (0, 1)")
    if not all(math.isfinite(v) for v in signals.values()):
        raise InvalidSaveError("a threshold that is not a finite number")
    state.cache[THRESHOLDS] = {**value, "false_alarm_rate": rate, "signals": signals}


def _restore_calibration(state: FittedState, arrays: dict, value) -> None:
    from .trust import restore_calibration  # imported where a run holds one (trust's imports take 0.2 s)

    restore_calibration(state, arrays, value)


#: Where a state's cache holds trust's calibration and the thresholds of its chips (set by
#: :func:`actclust.analysis.trust.calibrate`).
CALIBRATION, THRESHOLDS = "trust", "trust_thresholds"
#: manifest key -> ``fn(state, arrays, value)`` putting back what :func:`kept` saved under that key, in this order
#: (the calibration takes the thresholds put back before it)
RESTORE = {"trust_thresholds": _restore_thresholds, "trust_calibration": _restore_calibration}


def kept(state: FittedState) -> dict:
    """``save(..., kept=)``: manifest key -> ``(JSON value, arrays)``. The thresholds of the trust chips of the last
    calibration, so that every view of the run states the same ones (also where the calibration was made on
    held-out data); trust's calibration where it was built on the run's own split (not one made on a held-out
    query: that is the user's data)."""
    out = {} if state.cache.get(THRESHOLDS) is None else {"trust_thresholds": (state.cache[THRESHOLDS], {})}
    if CALIBRATION not in state.cache:  # never calibrated in this process: nothing of trust's to import or keep
        return out
    from .trust import saved_calibration

    calibration = saved_calibration(state)
    return out if calibration is None else {**out, "trust_calibration": calibration[::-1]}
