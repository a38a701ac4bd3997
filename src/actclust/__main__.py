"""``python -m actclust``: the ``actclust`` command (a newcomer's first guess; ``python -m actclust.cli`` works too)."""
import sys

from .cli.commands import run

sys.exit(run())
