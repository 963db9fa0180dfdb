"""hosm-lightning: maximum-likelihood training of diffusion ODEs by high-order DSM (Lu et al., ICML 2022)."""

__version__ = "0.1.0"
