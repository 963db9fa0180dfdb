"""Probability-flow ODE solver settings as one validated object (docs/design.md §4).

:class:`ODEOptions` is shared by everything that solves dx/dt = h(x, t) = f − ½ g² s (eq. 2.1):
the likelihood (4.1) through :func:`~hosm_lightning.core.likelihood.ode_log_likelihood` and the
sampler through :func:`~hosm_lightning.core.likelihood.ode_sample`; :meth:`ODEOptions.likelihood_kwargs`
and :meth:`ODEOptions.sample_kwargs` give exactly their keyword arguments for a given SDE.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from .objective import DIVERGENCES, check_choice, check_time
from .sde import SDE

__all__ = ["ODEOptions", "ADAPTIVE_METHODS", "FIXED_STEP_METHODS", "METHODS"]

#: torchdiffeq's adaptive solvers (error control by rtol/atol)
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "scipy_solver")
#: torchdiffeq's fixed-grid solvers (they need a step_size: otherwise one step over [eps, T])
FIXED_STEP_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams")
METHODS = ADAPTIVE_METHODS + FIXED_STEP_METHODS


def _positive(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
    return float(value)


def _end_time(key: str, value: float | None, default: float, sde: SDE) -> float:
    """``value``, or the SDE's ``default`` if None; must lie below the SDE's T."""
    eps = default if value is None else value
    if not 0.0 < eps < sde.T:
        raise ValueError(f"{key} must lie in (0, T={sde.T}) for {type(sde).__name__}, got {eps!r}")
    return eps


@dataclass(frozen=True)
class ODEOptions:
    """Solver settings of the probability-flow ODE, for the likelihood and for sampling.

    Args:
        eps: likelihood: the time at which the solve starts (log p_eps is evaluated), in (0, 1);
            None uses the SDE's ``default_eps`` (1e-5 VP and VE, 1e-2 subVP).
        sample_eps: sampling: the time at which the solve from T stops, in (0, 1); None uses the
            SDE's ``default_sample_eps`` (1e-3 VP, 1e-5 VE, 1e-2 subVP).
        rtol: relative tolerance of adaptive solvers, > 0 (reference: 1e-5).
        atol: absolute tolerance of adaptive solvers, > 0 (reference: 1e-5).
        method: torchdiffeq solver: adaptive 'dopri5' (reference RK45), 'dopri8', 'bosh3',
            'fehlberg2', 'adaptive_heun', 'scipy_solver', or fixed-step 'euler', 'midpoint',
            'heun2', 'heun3', 'rk4', 'explicit_adams', 'implicit_adams', 'fixed_adams'.
        divergence: likelihood only: ∇·h by 'exact' trace (D reverse passes), 'hutchinson'
            (one Rademacher probe per sample, held over the solve) or 'auto' (exact if D <= 4).
        step_size: time step of the fixed-step methods, > 0 (required by them; adaptive methods
            ignore it).
    """

    eps: float | None = None
    sample_eps: float | None = None
    rtol: float = 1e-5
    atol: float = 1e-5
    method: str = "dopri5"
    divergence: str = "auto"
    step_size: float | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("eps", check_time("model.ode.eps", self.eps, "default_eps"))
        set_("sample_eps", check_time("model.ode.sample_eps", self.sample_eps, "default_sample_eps"))
        set_("rtol", _positive("model.ode.rtol", self.rtol))
        set_("atol", _positive("model.ode.atol", self.atol))
        check_choice("model.ode.method", self.method, METHODS)
        check_choice("model.ode.divergence", self.divergence, DIVERGENCES)
        if self.step_size is not None:
            set_("step_size", _positive("model.ode.step_size", self.step_size))
        elif self.method in FIXED_STEP_METHODS:
            raise ValueError(f"model.ode.step_size must be set (> 0, e.g. 0.01) for the fixed-step method {self.method!r}")

    def replace(self, **changes) -> ODEOptions:
        """A copy with ``changes`` applied (validated again); keys whose value is None are ignored, so
        optional overrides can be passed through as they come."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise ValueError(f"unknown ODE option(s) {unknown}; valid: {names}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def _options(self) -> dict | None:
        return {"step_size": self.step_size} if self.method in FIXED_STEP_METHODS else None

    def likelihood_kwargs(self, sde: SDE) -> dict:
        """Keyword arguments of ``ode_log_likelihood`` (4.1): eps, rtol, atol, method, divergence, options."""
        return {
            "eps": _end_time("model.ode.eps", self.eps, sde.default_eps, sde),
            "rtol": self.rtol, "atol": self.atol, "method": self.method,
            "divergence": self.divergence, "options": self._options(),
        }

    def sample_kwargs(self, sde: SDE) -> dict:
        """Keyword arguments of ``ode_sample``: eps (= sample_eps), rtol, atol, method, options."""
        return {
            "eps": _end_time("model.ode.sample_eps", self.sample_eps, sde.default_sample_eps, sde),
            "rtol": self.rtol, "atol": self.atol, "method": self.method, "options": self._options(),
        }

    def as_dict(self) -> dict:
        """The fields as a plain dict (safe for ``weights_only=True`` checkpoints' hyperparameters)."""
        return dataclasses.asdict(self)
