"""The one error type the project raises for bad input."""

from __future__ import annotations


class SamsError(ValueError):
    """Bad input or an impossible request.

    The message always names the problem and the fix, so that the command line and the
    dashboard can show it to the user as it is.
    """
