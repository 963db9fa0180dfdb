"""Command-line hygiene: one-line parse errors with a "did you mean", and quiet library noise."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import logging
import os
import re
import sys
import warnings

from lightning.pytorch.cli import LightningArgumentParser

__all__ = ["HOSMParser", "quiet_library_noise", "one_line_parse_error"]


def quiet_library_noise() -> None:
    """Silence the library messages that say nothing about the user's run (each by its exact text).

    - Lightning 2.6's pytree helper builds torch's deprecated ``LeafSpec`` on every fit (an
      incompatibility between the two libraries, not in this project's code);
    - torch's forward-mode AD decompositions call ``torch.jit.script`` the first time an order-2/3
      loss runs (torch's own code; it printed into the progress bar when a stage started);
    - Lightning's advertisement for its cloud logger.
    """
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    lg = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in lg.filters):
        lg.addFilter(_DropTips())


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\U0001f4a1 Tip:")


def _close_matches(word: str, candidates) -> list[str]:
    return difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)


def _resolve_class(class_path: str):
    """The class named by a dotted path, or None if it cannot be imported."""
    try:
        module, _, name = class_path.rpartition(".")
        return getattr(importlib.import_module(module), name)
    except Exception:
        return None


def _class_params(class_path: str) -> list[str]:
    cls = _resolve_class(class_path)
    try:
        return list(inspect.signature(cls).parameters) if cls is not None else []
    except (TypeError, ValueError):
        return []


def _is_settings(class_path: str) -> bool:
    """A settings dataclass (HOSMObjective, ODEOptions, FitOptions): nested keys without ``init_args``."""
    return dataclasses.is_dataclass(_resolve_class(class_path))


def one_line_parse_error(message: str, parser) -> str:
    """A jsonargparse error as one line, with a "did you mean" for a mistyped key."""
    prog = (getattr(parser, "prog", "") or "").replace(" [options]", "")
    hint = f" (`{prog} --help` lists the options)" if prog else ""
    dests = [a.dest for a in getattr(parser, "_actions", []) if getattr(a, "dest", None)]
    m = re.search(r"[Uu]nrecognized arguments: (\S+)", message)
    if m:
        key = m.group(1).lstrip("-").split("=")[0]
        match = _close_matches(key, dests)
        mean = f"; did you mean --{match[0]}?" if match else ""
        return f"unknown option --{key}{mean}{hint}"
    m = re.search(r"Subcommand '[\w.]+' does not accept (?:option|nested key) '([\w.]+)'", message)
    if m:
        key = m.group(1)
        match = _close_matches(key, dests)
        mean = f"; did you mean {match[0]}?" if match else ""
        return f"unknown key {key}{mean}{hint}"
    m = re.search(r"Group '([\w.]+)' does not accept (?:option|nested key) '([\w.]+)'", message)
    if m:
        group, opt = m.groups()
        match = _close_matches(opt, [d[len(group) + 1:] for d in dests if d.startswith(group + ".")])
        mean = f"; did you mean {group}.{match[0]}?" if match else ""
        return f"unknown key {group}.{opt}{mean}{hint}"
    m = re.search(r"class_path '([\w.]+)':\s*(?:Key|Option) '([\w.]+)' is not (?:accepted|expected)", message)
    if m:
        class_path, opt = m.groups()
        keym = re.search(r'(?:Parser key|key) "([\w.]+)"', message)
        nested = ".init_args." if not _is_settings(class_path) else "."  # settings dataclasses have no init_args
        prefix = f"{keym.group(1)}{nested}" if keym else ("data.init_args." if "DataModule" in message else "")
        match = _close_matches(opt, _class_params(class_path))
        if any(arg.split("=")[0] == f"--{prefix}{opt}" for arg in sys.argv[1:]):  # typed on the command line
            mean = f"; did you mean --{prefix}{match[0]}?" if match else ""
            return f"unknown option --{prefix}{opt}{mean}{hint}"
        mean = f"; did you mean {prefix}{match[0]}?" if match else ""
        return f"unknown key {prefix}{opt} for {class_path.rsplit('.', 1)[-1]}{mean}{hint}"
    noise = ("Given value", "Subtypes:", "Errors:", "- Expected a <class 'NoneType'>")
    parts = [ln.strip() for ln in message.splitlines() if ln.strip() and not ln.strip().startswith(noise)]
    return " ".join(parts) + hint


class HOSMParser(LightningArgumentParser):
    """Parse errors as one line ``hosm-lightning: error: ...`` (HOSM_DEBUG=1: jsonargparse's full output)."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("HOSM_DEBUG") or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        sys.stderr.write(f"hosm-lightning: error: {one_line_parse_error(message, parser)}\n")
        self.exit(2)
