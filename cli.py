#!/usr/bin/env python
"""Entry point: `python cli.py {fit,validate,test,sample,likelihood,diagnose} --config configs/<name>.yaml`.

See README.md ("Command line") and `python cli.py <subcommand> --help`.
"""

from hosm_lightning.cli import run_cli

if __name__ == "__main__":
    run_cli()
