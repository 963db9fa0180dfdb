"""Lightning-free math core: SDEs, high-order DSM losses, ODE likelihood, exact mixtures."""

from .likelihood import bits_per_dim, dequantize, nats_to_bpd, ode_log_likelihood, ode_sample
from .dequantization import dequantization_draws, importance_bound, truncnorm_log_prob
from .dsm_terms import DSMTerms, perturb
from .losses import dsm_losses
from .mixtures import GaussianMixture, paper_mog1d
from .objective import HOSMObjective
from .ode_options import ODEOptions
from .sde import SDE, SubVPSDE, VESDE, VPSDE, make_sde

__all__ = [
    "SDE", "VPSDE", "SubVPSDE", "VESDE", "make_sde",
    "dsm_losses", "perturb", "DSMTerms", "HOSMObjective",
    "ode_log_likelihood", "ode_sample", "ODEOptions", "bits_per_dim", "dequantize", "nats_to_bpd",
    "GaussianMixture", "paper_mog1d",
    "dequantization_draws", "importance_bound", "truncnorm_log_prob",
]
