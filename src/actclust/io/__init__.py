"""Reading and writing runs: :mod:`.persistence` (save and load, no pickle)."""
