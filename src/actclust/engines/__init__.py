"""Where a pass of the model runs when not in this process: :mod:`.ray` (Ray Data actors)."""
