"""Command-line hygiene: one-line parse errors with a "did you mean", a short ``--help``, quiet library noise."""

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

__all__ = ["HOSMParser", "quiet_library_noise", "one_line_parse_error", "compact_help"]


def quiet_library_noise() -> None:
    """Silence the library messages that say nothing about the user's run (each by its exact text).

    - Lightning 2.6's pytree helper builds torch's deprecated ``LeafSpec`` on every fit (an
      incompatibility between the two libraries, not in this project's code);
    - torch's forward-mode AD decompositions call ``torch.jit.script`` the first time an order-2/3
      loss runs (torch's own code; it printed into the progress bar when a stage started);
    - Lightning's advertisement for its cloud logger;
    - ModelCheckpoint's "Checkpoint directory ... exists and is not empty" on every resume: a fresh
      ``fit`` into a folder with checkpoints is refused by the CLI before Lightning could say it.
    """
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
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
    """Parse errors as one line ``hosm-lightning: error: ...`` (HOSM_DEBUG=1: jsonargparse's full output),
    and a subcommand's ``--help`` as :func:`compact_help`."""

    def format_help(self, formatter=None) -> str:
        if any(a.dest.startswith("trainer.") for a in self._actions):  # a subcommand's parser
            return compact_help(self)
        return super().format_help() if formatter is None else super().format_help(formatter)

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("HOSM_DEBUG") or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        sys.stderr.write(f"hosm-lightning: error: {one_line_parse_error(message, parser)}\n")
        self.exit(2)


# -- a subcommand's --help: our options first, one line each ----------------------------------------
_SENTENCE_END = re.compile(r"\.(?=\s+[A-Z]|\s*$)")  # not "e.g. x", "eq. 3.2" or "core.HOSMObjective"
_GROUPS = (  # (dest prefix, title), in the order shown
    ("model", "model: the score network, SDE, objective, stage schedule, optimizer, ODE and evaluation settings (HOSMModule; "
              "`--model.net.help ToyScoreNet` describes a network's options)"),
    ("data", "data: a LightningDataModule (`--data.help SyntheticDataModule` describes its options)"),
    ("", "{sub}"),
    ("trainer", "trainer: Lightning's Trainer (the Lightning documentation describes each option in full)"),
)
_SKIP = ("_HelpAction", "_ActionHelpClassPath")


def _first_sentence(text: str | None) -> str:
    text = " ".join((text or "").split()).replace("``", "`")
    end = _SENTENCE_END.search(text)
    return text[: end.start() + 1] if end else text


def _short(value) -> str | None:
    if value is None or value == "==SUPPRESS==" or (isinstance(value, str) and value == ""):
        return None
    if isinstance(value, dict) and "class_path" in value:
        value = value["class_path"]
    text = str(value)
    return text if len(text) <= 40 else None


def _ours(action) -> list[str]:
    """Our classes among the known subclasses jsonargparse lists for a class-typed option (not the
    private or abstract ones, which are no choice for a config)."""
    extra = action.extra_help() if hasattr(action, "extra_help") else ""
    names = extra.split("known subclasses: ", 1)[1].split(", ") if "known subclasses: " in extra else []
    hint = getattr(action, "_typehint", None)
    bases = {c.__name__ for c in (hint, *getattr(hint, "__args__", ())) if isinstance(c, type)}
    return [n for n in names if n.startswith("hosm_lightning.") and n.rsplit(".", 1)[-1] not in bases
            and not n.rsplit(".", 1)[-1].startswith("_") and not inspect.isabstract(_resolve_class(n))]


def _settings_class(action):
    """The settings dataclass of an option typed ``Settings | None`` (objective, ode, fit ...), else None."""
    hint = getattr(action, "_typehint", None)
    for cls in (hint, *getattr(hint, "__args__", ())):
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            return cls
    return None


def _row(head: str, text: str, width: int) -> str:
    return f"{head:<{width}}  {text}" if len(head) <= width else f"{head}  {text}"


def _option_line(action, width: int) -> str:
    name = ", ".join(action.option_strings)
    metavar = action.metavar or ("" if action.nargs == 0 else action.dest.rsplit(".", 1)[-1].upper())
    notes = ["required"] if action.required else []
    ours = _ours(action)
    if ours:
        notes.append("one of " + ", ".join(ours))
    default = _short(action.default)
    if default is not None and not ours:
        notes.append(f"default: {default}")
    text = _first_sentence(action.help) + (f" ({'; '.join(notes)})" if notes else "")
    return _row(f"  {name} {metavar}".rstrip(), text, width)


def _settings_lines(action, width: int) -> list[str]:
    """One line per field of a settings dataclass (``--model.objective.lambda2`` ...)."""
    from jsonargparse import ArgumentParser

    sub = ArgumentParser(exit_on_error=False)
    try:
        sub.add_class_arguments(_settings_class(action), action.dest, fail_untyped=False)
    except Exception:  # an unusual signature: the one-line entry above still describes the option
        return []
    return [_option_line(a, width) for a in sub._actions
            if a.dest.startswith(action.dest + ".") and type(a).__name__ not in _SKIP]


def _group_of(dest: str) -> str:
    head = dest.split(".", 1)[0]
    return head if head in ("model", "data", "trainer", "seed_everything") else ""


def compact_help(parser, width: int = 38) -> str:
    """A subcommand's help: the model, data and subcommand options first, Lightning's Trainer last,
    one line per option (the first sentence of its description, then required / our classes /
    default); the fields of the settings objects (``--model.objective.*``, ``--model.ode.*``,
    ``--model.fit.*``) are listed one by one."""
    sub = parser.prog.split()[-1]
    actions = [a for a in parser._actions if a.option_strings and type(a).__name__ not in _SKIP
               and a.dest not in ("config", "print_config", "help")]
    lines = [f"usage: {parser.prog} [-h] [-c CONFIG] [--print_config] [--KEY VALUE ...]", "",
             _first_sentence(parser.description), "", "options:",
             _row("  -h, --help", "show this help message and exit", width),
             _row("  -c CONFIG, --config CONFIG", "a YAML config; repeat it to compose files (later ones override)", width),
             _row("  --print_config", "print the full configuration (after all other arguments) and exit", width)]
    lines += [_option_line(a, width) for a in actions if _group_of(a.dest) == "seed_everything"]
    for prefix, title in _GROUPS:
        group = [a for a in actions if _group_of(a.dest) == prefix]
        if group:
            lines += ["", title.format(sub=f"{sub}:")]
        for a in group:
            lines.append(_option_line(a, width))
            if prefix == "model" and _settings_class(a) is not None:
                lines += _settings_lines(a, width)
    return "\n".join(lines) + "\n"
