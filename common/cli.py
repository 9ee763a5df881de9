"""What the command lines share: flag types that refuse nonsense before anything is built, the
check that the project's own modules are the ones imported, and how a command ends on a user's
error (one line on stderr, exit status 2) rather than with a traceback (which means a bug).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

# what a user's mistake raises: a bad value, a missing or existing file, a refused setting
USER_ERRORS = (ValueError, OSError, ImportError)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def at_least(minimum: int):
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def number(minimum: float = 0.0, strict: bool = True):
    """An argparse type: a finite float > minimum (strict) or >= minimum."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            bound = ">" if strict else ">="
            raise argparse.ArgumentTypeError(f"must be a finite number {bound} {minimum}, "
                                             f"got {text}")
        return value
    return parse


def check_own_modules(*names: str) -> None:
    """The scripts import `data`, `eval` and `common` by these generic names: a file of the
    same name earlier on sys.path (a user's own data.py in the working folder) would be
    imported instead and fail far from the cause. Say so at once."""
    for name in names:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None) or ""
        if module is not None and not os.path.abspath(path).startswith(ROOT + os.sep):
            raise ImportError(f"the module {name!r} imported from {path!r} is not this "
                              f"project's ({ROOT}): a file or package of that name shadows it. "
                              "Rename yours, or run from another folder.")


def run(main) -> None:
    """Run a command's main: a user error prints `error: MESSAGE` and exits with status 2
    (RIS_TRACEBACK=1 shows its traceback); any other exception is a bug and keeps its traceback."""
    try:
        main()
    except USER_ERRORS as err:
        if os.environ.get("RIS_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
