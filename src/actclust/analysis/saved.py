"""What a fitted state's analyses keep with a saved run, so that a loaded run does not build them again.

The approximate search indexes go beside the run as files (memory-mapped at load); trust's calibration
on the run's own split goes into the run's manifest and array file. The run's writer and reader
(:mod:`actclust.io.persistence`) take both as plain data and callbacks from here: they import no analysis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .retrieval import attach_saved_indexes, saved_index_files

if TYPE_CHECKING:
    from ..state import FittedState

__all__ = ["kept", "RESTORE", "saved_index_files", "attach_saved_indexes"]


def _restore_calibration(state: FittedState, arrays: dict, value) -> None:
    from .trust import restore_calibration  # imported where a run holds one (trust's imports take 0.2 s)

    restore_calibration(state, arrays, value)


#: manifest key -> ``fn(state, arrays, value)`` putting back what :func:`kept` saved under that key
RESTORE = {"trust_calibration": _restore_calibration}


def kept(state: FittedState) -> dict:
    """``save(..., kept=)``: manifest key -> ``(JSON value, arrays)``; trust's calibration where one was built
    on the run's own split (not one made on a held-out query: that is the user's data)."""
    if "trust" not in state.cache:  # never calibrated in this process: nothing of trust's to import or keep
        return {}
    from .trust import saved_calibration

    calibration = saved_calibration(state)
    return {} if calibration is None else {"trust_calibration": calibration[::-1]}
