"""The one error base class and the exit codes of every ``medseg-dpl`` verb.

Every error a user can cause (bad input, a bad config key, a refused checkpoint, a run that
cannot start) derives from :class:`MedsegError`; every verb prints ``error: <message>`` (the
message names the file or key and the cause) and exits with :data:`EXIT_ERROR`. Command-line
usage errors (an unknown option, a missing argument) are argparse's: :data:`EXIT_USAGE`. Each
error class also keeps its historical builtin base (``ValueError``, ``RuntimeError``) so code
that caught those still does.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1     # refused or failed: bad input, config or checkpoint, problems found by check
EXIT_USAGE = 2     # the command line itself is wrong (argparse's convention)
EXIT_CODES_HELP = ("exit codes: 0 success; 1 refused or failed (bad input, config or checkpoint, "
                   "problems found; the message names the file or key and the cause, and nothing "
                   "half-written is left); 2 command-line usage error")


class MedsegError(Exception):
    """Base of every error medseg-dpl raises for bad input or an impossible request."""

    exit_code = EXIT_ERROR
