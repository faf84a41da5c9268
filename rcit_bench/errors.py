"""The one error type for the user's mistakes.

Why: the command line prints a user's mistake (a bad spec key, an unknown name, missing or malformed data)
as one line that names the problem and the fix, and shows the full traceback for everything else, which
is a bug to report. `UserError` subclasses ValueError, so code catching ValueError keeps working.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """A mistake in the user's input (spec, arguments, data files); the message says what to change."""
