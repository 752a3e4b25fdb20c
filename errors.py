"""UserError: a mistake the user can fix (a flag, a path, a file, a checkpoint), in one sentence.

Library code raises it; each script's main is wrapped in `exit_on_user_error`, which prints
"error: <the sentence>" and exits with status 1. Any other exception, a bug's ValueError included,
keeps its traceback. It lives here, apart from the math and the models, because every file can
import it for nothing: the standard library only, no torch, no cycles.
"""
import functools
import sys


class UserError(ValueError):
    """A mistake in the user's input. A ValueError, so code that catches those still catches it."""


def exit_on_user_error(main):
    """Wrap a script's main: a UserError becomes "error: <sentence>" on stderr and exit status 1."""
    @functools.wraps(main)
    def guarded(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            sys.exit(f"error: {e}")
    return guarded
