"""What every ``actclust`` command shares: option types, help format, and how it speaks."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import shlex
import sys
from typing import Optional

__all__ = ["HelpFormatter", "int_at_least", "port_number", "OVERWRITE_FLAG", "command", "say", "warn", "run_model_options",
           "is_loopback", "url_host", "listen", "serve"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after each option's help, except where there is nothing to show.

    A flag's default (off) and an unset option (whose help says in words what happens) would read
    "(default: False)" / "(default: None)", which says nothing to a user.
    """

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.nargs == 0:  # a flag: its help says it
            return action.help
        return super()._get_help_string(action)


def int_at_least(low: int, why: str = "", high: Optional[int] = None):
    """An argparse ``type`` for integers >= ``low`` (and <= ``high``); the error is worded for the option it checks."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer; got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f"at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {span}{why}; got {value}")
        return value

    return parse


#: ``--port``: a TCP port, or 0 for one the system picks.
port_number = int_at_least(0, " (0: any free port)", high=65535)


def run_model_options(p) -> None:
    """--model, --weights and --trust-run-model, for the commands that load a saved run."""
    p.add_argument("--model", help="your model: an .onnx or .keras file, or the callable that builds it as "
                                   "package.module:callable, imported as by 'fit' (default: the one the run records, if "
                                   "it is one of actclust's own builders; see --trust-run-model)")
    p.add_argument("--weights", help="state dict for the model (default: the weights file inside the run)")
    p.add_argument("--trust-run-model", action="store_true",
                   help="import and run the model callable the run records even when it is not one of actclust's "
                        "own (it says which files first; never from inside the run folder). Only for runs you trust")


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


def is_loopback(host: str) -> bool:
    """Whether a server listening on ``host`` is reachable from this machine only (the servers warn otherwise)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """``host`` as a URL names it (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


def listen(host: str, port: int):
    """A socket bound to ``host:port`` for a local server, bound before any long start so that a port in use is said
    at once (a :class:`~actclust.ParameterError` naming ``--port``); ``port`` 0 takes a free one."""
    import socket

    from ..exceptions import ParameterError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, as uvicorn's own sockets: asyncio sets TCP_NODELAY only on those
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ParameterError(f"Cannot listen on {host}:{port} ({e.strerror}); choose another --port "
                             "(or stop what uses it).") from None
    return sock


#: Seconds a stopping server gives the requests in progress (a stalled upload kept Ctrl-C waiting without end).
GRACE_S = 5


def serve(app, sock, **options) -> None:
    """Run the ASGI ``app`` on the socket of :func:`listen` until interrupted (``options``: uvicorn's ``Config``):
    on Ctrl-C, new connections are refused and the requests in progress get :data:`GRACE_S` seconds to finish (then
    they are cancelled, and the app's shutdown still runs: a study commits its queued writes); said on the first."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                print(f"stopping: requests in progress get {GRACE_S} s to finish (Ctrl-C again stops now)",
                      file=sys.stderr, flush=True)
            super().handle_exit(sig, frame)

    config = {"log_level": "warning", "access_log": False, "timeout_graceful_shutdown": GRACE_S, **options}
    server = Server(uvicorn.Config(app, **config))

    def quiet_when_stopping(record: logging.LogRecord) -> bool:
        # once stopping, the requests cancelled after the grace time (or at a second Ctrl-C) log their tracebacks:
        # noise to the user, who asked for the stop and was told what it does
        return not (server.should_exit and (record.exc_info or str(record.msg).startswith("Traceback")))

    log = logging.getLogger("uvicorn.error")
    log.addFilter(quiet_when_stopping)
    try:
        server.run(sockets=[sock])
    finally:
        log.removeFilter(quiet_when_stopping)
        sock.close()
