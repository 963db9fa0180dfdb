"""Validation of settings objects: one-line errors that name the field.

Settings dataclasses (``HOSMObjective``, ``ODEOptions`` and the Lightning layer's ``FitOptions`` and
``EvalOptions``) check their fields once, in ``__post_init__``, with the helpers below. A bad value
raises :class:`SettingsError`, which names the class and the field (``HOSMObjective.lambda2 must be
>= 0, got -1.0``); the command line turns the class into the config key the user typed
(``model.objective.lambda2``), so no config path is written down here.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["SettingsError", "choice", "number", "integer", "time_or_none", "flag", "find_settings_error"]


class SettingsError(ValueError):
    """A bad field of a settings object: ``owner`` (class name), ``field`` and the ``problem``."""

    def __init__(self, owner: str, field: str, problem: str):
        self.owner, self.field, self.problem = owner, field, problem
        super().__init__(f"{owner}.{field} {problem}")


def find_settings_error(err: BaseException | None) -> SettingsError | None:
    """The :class:`SettingsError` in ``err``'s chain of causes (config parsers wrap it), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, SettingsError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def choice(owner: str, field: str, value, allowed: tuple):
    """``value`` if it is one of ``allowed``."""
    if value not in allowed:
        raise SettingsError(owner, field, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def number(owner: str, field: str, value, *, positive: bool = False) -> float:
    """A finite number, >= 0 (or > 0 with ``positive``), as float."""
    if not _real(value) or value < 0 or (positive and value == 0):
        raise SettingsError(owner, field, f"must be a finite number {'>' if positive else '>='} 0, got {value!r}")
    return float(value)


def integer(owner: str, field: str, value, minimum: int = 0) -> int:
    """An integer >= ``minimum`` (floats with an integer value are accepted), as int."""
    if not _real(value) or int(value) != value or value < minimum:
        raise SettingsError(owner, field, f"must be an integer >= {minimum}, got {value!r}")
    return int(value)


def time_or_none(owner: str, field: str, value, default: str) -> float | None:
    """None (the SDE's ``default``) or a time in (0, 1) (T = 1 for every SDE), as float."""
    if value is None:
        return None
    if not _real(value) or not 0.0 < value < 1.0:
        raise SettingsError(owner, field, f"must be null (the SDE's {default}) or a number in (0, 1), got {value!r}")
    return float(value)


def flag(owner: str, field: str, value) -> bool:
    """A bool (true / false)."""
    if not isinstance(value, bool):
        raise SettingsError(owner, field, f"must be true or false, got {value!r}")
    return value
