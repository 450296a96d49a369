"""Bugs the fuzzers found that are reported but not fixed yet: the suppression list.

A crash whose exception and traceback match an entry here is *known*: the
short fuzz runs in ``make test`` and ``python -m tools.fuzz`` count it and go
on looking for other bugs instead of stopping at it again.  Each entry has a
regression input in ``tests/fuzz/regressions/<target>/<id>-*.bin``;
``test_regressions.py`` expects those to fail while the entry is here and fails
as soon as one passes, so a fix must delete its entry (and the regression then
guards it for good).  ``python -m tools.fuzz --report-known`` treats known bugs
as crashes again.
"""

from __future__ import annotations

import os
import re
import traceback
from dataclasses import dataclass

__all__ = ["Known", "KNOWN", "match", "signature"]

_PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class Known:
    id: str  #: prefix of its regression files
    target: str
    exceptions: tuple  #: exception class names
    where: tuple  #: (file suffix, function or None): a frame of the traceback must be one of these
    bug: str  #: what is wrong and the fix proposed
    text: str = ""  #: if set, must occur in the exception's message


_BODY = ("KeyError", "TypeError", "ValueError", "OverflowError", "AttributeError")

KNOWN: tuple[Known, ...] = (
)


def _frames(exc: BaseException):
    for fr in traceback.extract_tb(exc.__traceback__):
        path = os.path.abspath(fr.filename)
        if path.startswith(_PROJECT):
            yield os.path.relpath(path, _PROJECT), fr.name


def match(target: str, exc: BaseException) -> Known | None:
    """The known bug ``exc`` (raised by ``target``) is an instance of, or None."""
    name = type(exc).__name__
    frames = list(_frames(exc))
    for k in KNOWN:
        if k.target != target or name not in k.exceptions or k.text not in str(exc):
            continue
        for suffix, func in k.where:
            if any(f.endswith(suffix) and (func is None or fn == func) for f, fn in frames):
                return k
    return None


def signature(exc: BaseException) -> str:
    """``Type at file:function`` of the innermost project frame: how crashes are told apart."""
    if type(exc).__name__ == "InvariantBroken":  # raised by the target itself: tell them apart by the check
        where = [fn for f, fn in _frames(exc) if f.startswith("tests/fuzz/") and fn.startswith("t_")] or ["?"]
        return f"InvariantBroken in {where[-1]}: {re.sub(r'[0-9]+', 'N', str(exc))[:70]}"
    frames = [f for f in _frames(exc) if not f[0].startswith("tests/fuzz/")] or list(_frames(exc)) or [("?", "?")]
    path, func = frames[-1]
    return f"{type(exc).__name__} at {path}:{func}"
