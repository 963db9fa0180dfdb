"""A real HOSMModule whose score is a closed form (tests of the evaluator and the likelihood path)."""

from __future__ import annotations

import torch

from hosm_lightning.core import ODEOptions
from hosm_lightning.data import DataSpec
from hosm_lightning.lit.module import HOSMModule
from hosm_lightning.nets.base import ScoreNet


class ExactScoreNet(ScoreNet):
    """net(x, t, sigma) = score_fn(x, t): an analytic score as a network (parameterization 'score')."""

    def __init__(self, score_fn, dim: int):
        super().__init__()
        self.score_fn, self.dim = score_fn, dim

    def forward(self, x, t, sigma=None):
        return self.score_fn(x, t)


def exact_module(score_fn, sde, dim: int, centered: bool = True, rtol: float = 1e-5, atol: float = 1e-5) -> HOSMModule:
    module = HOSMModule(ExactScoreNet(score_fn, dim), sde=sde, parameterization="score",
                        ode=ODEOptions(eps=1e-5, rtol=rtol, atol=atol))
    module.data_spec = DataSpec(centered=centered)  # what setup() reads from the data module
    return module.to(torch.device("cpu"))


_OBJECTIVE = ("lambda2", "lambda3", "eps", "divergence", "dsm2_form", "probe_product", "importance_sampling")
_ODE = ("rtol", "atol", "method", "step_size", "sample_eps")
_FIT = ("warmup_steps", "seed", "check_finite_every", "grad_norm_every", "val_likelihood", "init_from", "init_from_ema")


def grouped(**kw) -> dict:
    """HOSMModule keyword arguments from one flat dict: objective fields → ``objective=HOSMObjective``,
    ``rtol/atol/...`` → ``ode=ODEOptions``, fit-loop fields → ``fit=FitOptions``; the rest as given."""
    from hosm_lightning.core import HOSMObjective
    from hosm_lightning.lit.options import FitOptions

    out = {k: v for k, v in kw.items() if k not in _OBJECTIVE + _ODE + _FIT}
    out["objective"] = HOSMObjective(**{k: kw[k] for k in _OBJECTIVE if k in kw})
    out["ode"] = ODEOptions(**{k: kw[k] for k in _ODE if k in kw})
    out["fit"] = FitOptions(**{k: kw[k] for k in _FIT if k in kw})
    return out
