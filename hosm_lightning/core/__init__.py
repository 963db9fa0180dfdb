"""Lightning-free math core: SDEs, the high-order DSM objective, the probability-flow ODE, bits/dim,
exact Gaussian mixtures."""

from .dequantization import DequantizedBound, bits_per_dim, dequantization_draws, importance_bound, truncnorm_log_prob
from .mixtures import GaussianMixture, paper_mog1d
from .objective import DSMTerms, HOSMObjective
from .ode import Likelihood, ODEOptions, ODEScore, Samples, ode_log_likelihood, ode_sample, ode_score
from .sde import SDE, VESDE, VPSDE, SubVPSDE, make_sde
from .settings import SettingsError
from .stats import mean_se

__all__ = [
    "SDE", "VPSDE", "SubVPSDE", "VESDE", "make_sde",
    "HOSMObjective", "DSMTerms",
    "ODEOptions", "ode_log_likelihood", "ode_sample", "ode_score", "Likelihood", "Samples", "ODEScore",
    "bits_per_dim", "DequantizedBound", "dequantization_draws", "importance_bound", "truncnorm_log_prob",
    "GaussianMixture", "paper_mog1d", "SettingsError", "mean_se",
]
