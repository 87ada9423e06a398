"""Offline operations on a store and its database (`sstate-proxy import`, `gc`, ...).

Each command registers its parser here and runs against the configured store and database,
without a running server.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

COMMANDS: dict[str, Callable] = {}


def add_parsers(sub: argparse._SubParsersAction, add_config_args: Callable) -> None:
    """Register the operation sub-commands."""
    from proxy import dbcopy, importer, retention

    importer.add_parser(sub, add_config_args)
    COMMANDS["import"] = importer.command
    dbcopy.add_parser(sub, add_config_args)
    COMMANDS["db"] = dbcopy.command
    retention.add_parser(sub, add_config_args)
    COMMANDS["gc"] = retention.command


def run(command: str, cfg, args: argparse.Namespace) -> int:
    handler = COMMANDS.get(command)
    if handler is None:
        raise ValueError(f"unknown command {command!r}")
    return handler(cfg, args)
