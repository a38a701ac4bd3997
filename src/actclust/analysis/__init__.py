"""Analyses of a fitted state and a query: NumPy, SciPy and faiss only, no framework.

:mod:`.surrogate` (the class mixes and scores), :mod:`.retrieval` (similar training samples),
:mod:`.concepts`, :mod:`.explanation`, :mod:`.trust` and :mod:`.baselines`.
"""
