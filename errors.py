"""UserError: a mistake the user can fix (a flag, a path, a file, a checkpoint), in one sentence.

Library code raises it; each script's main is wrapped in `exit_on_user_error`, which prints
"error: <the sentence>" and exits with status 1. Any other exception, a bug's ValueError included,
keeps its traceback. It lives here, apart from the math and the models, because every file can
import it for nothing: the standard library only, no torch, no cycles.
"""
import difflib
import functools
import sys


class UserError(ValueError):
    """A mistake in the user's input. A ValueError, so code that catches those still catches it."""


def did_you_mean(word, options):
    """" (did you mean 'x'?)" for the option nearest to a mistyped `word`, or "" if none is."""
    near = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""


def exit_on_user_error(main):
    """Wrap a script's main: a UserError becomes "error: <sentence>" on stderr and exit status 1."""
    @functools.wraps(main)
    def guarded(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            sys.exit(f"error: {e}")
    return guarded
