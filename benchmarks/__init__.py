"""Benchmarks of hosm-lightning, run as modules from the repository root with the package installed
(``pip install -e .``)::

    python -m benchmarks.step_cost --quick          # one training step per DSM order: time, memory
    python -m benchmarks.unet_step --quick          # the same for the DDPM++ / NCSN++ U-Nets
    python -m benchmarks.likelihood_speed --quick   # the exact ODE likelihood against a scipy baseline
    python -m benchmarks.dequantization --quick     # bits/dim protocols on 8-bit data of known entropy
    python -m benchmarks.synthetic --quick          # the paper's fine-tuning protocol on toy data
    python -m benchmarks.dsm3_weighting --quick     # dsm3 weighted down at large σ
    bash benchmarks/gpu_check.sh                    # one table of the U-Nets at the paper's size on a GPU

Modules whose names start with an underscore are shared by the benchmarks: ``_harness`` (timing,
peak memory, Markdown tables, progress), ``_protocol`` (training and evaluating toy runs),
``_report`` / ``_sweep`` (the synthetic benchmark's evaluation and reports) and ``_figures``.
"""

from pathlib import Path

#: the repository root (default locations of results and training runs)
ROOT = Path(__file__).resolve().parents[1]
