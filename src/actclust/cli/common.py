"""What every ``actclust`` command shares: option types, help format, and how it speaks."""

from __future__ import annotations

import argparse
import shlex
import sys

__all__ = ["HelpFormatter", "int_at_least", "OVERWRITE_FLAG", "command", "say", "warn"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after each option's help, except where there is nothing to show.

    A flag's default (off) and an unset option (whose help says in words what happens) would read
    "(default: False)" / "(default: None)", which says nothing to a user.
    """

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def int_at_least(low: int, why: str = ""):
    """An argparse ``type`` for integers >= ``low``; the error is worded for the option it checks."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}{why}; got {value}")
        return value

    return parse


OVERWRITE_FLAG = "add --overwrite"  # how the CLI replaces a run or a report, in its messages


def command(*words: str) -> str:
    """A command line a user can paste into a shell."""
    return shlex.join(["actclust", *map(str, words)])


def say(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def warn(args, message: str) -> None:
    """A warning the user must see: on stderr, also with --quiet (which silences progress only)."""
    print(f"actclust {args.command}: warning: {message}", file=sys.stderr)
