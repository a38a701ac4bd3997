"""Which condition(s) a participant sees, on which items, in which order.

* **between**: one condition per participant, the least-filled one so far (ties broken at
  random), all items.
* **within**: every participant sees every condition, each on a different block of items, the
  blocks rotated along a cyclic Latin square by participant number, so that over ``C``
  consecutive participants each item is shown once under each condition. Blocks are made per
  AI correctness, so each condition gets as many wrong predictions as the others (up to one).

The trial order is shuffled per participant, seeded by the study seed and the participant's
number: the same study and arrival order give the same plans.
"""

from __future__ import annotations

import random

__all__ = ["participant_rng", "assign_condition", "plan_trials"]


def participant_rng(seed: int, number: int) -> random.Random:
    """The random source of participant ``number`` (0-based arrival order) of a study seeded ``seed``."""
    return random.Random(f"actclust.study/{seed}/{number}")  # str seeds hash with SHA-512: stable across runs


def assign_condition(conditions: list, filled: dict, rng: random.Random) -> str:
    """The least-filled of ``conditions`` (``filled``: participants so far per condition), ties at random."""
    least = min(filled.get(c, 0) for c in conditions)
    return rng.choice([c for c in conditions if filled.get(c, 0) == least])


def plan_trials(items: list, conditions: list, design: str, number: int, condition, rng: random.Random) -> list:
    """``[(item_id, condition)]`` in presentation order for participant ``number``.

    ``items`` are the study's item dicts (``id``, ``ai_right``, ``attention``); ``condition`` is
    the assigned condition in a between-subjects design (ignored within subjects). Attention
    checks stay out of the Latin square and rotate through the conditions on their own.
    """
    checks = [it for it in items if it.get("attention")]
    items = [it for it in items if not it.get("attention")]
    if design == "between":
        trials = [(it["id"], condition) for it in items + checks]
    else:
        n_cond = len(conditions)
        ordered = [it for it in items if not it["ai_right"]] + [it for it in items if it["ai_right"]]
        trials = [(it["id"], conditions[(i + number) % n_cond]) for i, it in enumerate(ordered)]
        trials += [(it["id"], conditions[(i + number) % n_cond]) for i, it in enumerate(checks)]
    rng.shuffle(trials)
    return trials
