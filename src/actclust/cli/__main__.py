import sys

from .commands import run

sys.exit(run())
