"""Plugins: modules that register strategies (`strategies.register_strategy`) or confidence
measures (`confidence.register_measure`) when imported.

The command-line tools take `--plugin MODULE` (repeatable) and import it before they build
their argument choices from the registries, e.g.

    python tools/generate.py --plugin my_pkg.exit_at --strategy exit_at --load DIR --prompt "Hi"

In Python, importing the module is enough.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence


def load_plugins(modules: Sequence[str]) -> None:
    """Import each module (a dotted name on sys.path); ValueError naming --plugin if one fails."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"--plugin: cannot import {name!r}: {e}") from None


def load_plugins_from_argv(argv: Sequence[str] | None) -> None:
    """Import the `--plugin MODULE` arguments of a command line before its parser is built."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugin", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    load_plugins(known.plugin)
