"""Lightning-free math core: SDEs, high-order DSM losses, ODE likelihood, exact mixtures."""

from .likelihood import bits_per_dim, dequantize, nats_to_bpd, ode_log_likelihood, ode_sample
from .dequantization import dequantization_draws, importance_bound, truncnorm_log_prob
from .losses import dsm_losses
from .mixtures import GaussianMixture, paper_mog1d
from .sde import SDE, SubVPSDE, VESDE, VPSDE, make_sde

__all__ = [
    "SDE", "VPSDE", "SubVPSDE", "VESDE", "make_sde",
    "dsm_losses",
    "ode_log_likelihood", "ode_sample", "bits_per_dim", "dequantize", "nats_to_bpd",
    "GaussianMixture", "paper_mog1d",
    "dequantization_draws", "importance_bound", "truncnorm_log_prob",
]
