"""The one error base class and the exit codes of every ``medseg-dpl`` verb.

Every error a user can cause (bad input, a bad config key, a refused checkpoint, a run that
cannot start) derives from :class:`MedsegError`; the CLI prints ``error: <message>`` (the
message names the file or key and the cause) and exits with :data:`EXIT_USAGE`. Each error
class also keeps its historical builtin base (``ValueError``, ``RuntimeError``) so code that
caught those still does.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1   # the verb ran but its result is a failure (e.g. ``check`` found problems)
EXIT_USAGE = 2     # refused: bad input, config or checkpoint; nothing was written
EXIT_CODES_HELP = ("exit codes: 0 success; 1 the verb ran and reports a failure (check found "
                   "problems, a benchmark run failed); 2 refused: bad arguments, input, config or "
                   "checkpoint (the message names the file or key and the cause; nothing is written)")


class MedsegError(Exception):
    """Base of every error medseg-dpl raises for bad input or an impossible request."""

    exit_code = EXIT_USAGE
