"""An argparse helper: ``--intermediate-log-config`` / ``--intermediate-log-config-path`` for any script.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_intermediate_log_args(parser)
    >>> args = parser.parse_args(["--intermediate-log-config", '{"log_step_ids": [0, 1]}'])
    >>> config_from_args(args, parser).log_step_ids
    (0, 1)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import Config, load_config
from .errors import ConfigError

__all__ = ["add_intermediate_log_args", "config_from_args"]


def add_intermediate_log_args(parser: argparse.ArgumentParser) -> None:
    """Add the two config options (mutually exclusive) to ``parser``."""
    group = parser.add_argument_group("intermediate tensor logging (ilstore)")
    excl = group.add_mutually_exclusive_group()
    excl.add_argument("--intermediate-log-config", metavar="JSON", default=None,
                      help='capture config as JSON text, e.g. \'{"enabled": true}\' (see ilstore docs/config.md)')
    excl.add_argument("--intermediate-log-config-path", metavar="FILE", default=None,
                      help="capture config as a JSON file")


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> Config | None:
    """The resolved config, or None when neither option was given.

    A bad config ends the program through ``parser.error`` (exit status 2) when ``parser`` is
    given; otherwise :class:`~ilstore.errors.ConfigError` is raised.
    """
    text = getattr(args, "intermediate_log_config", None)
    path = getattr(args, "intermediate_log_config_path", None)
    try:
        if text is not None:
            stripped = text.strip()
            if not stripped.startswith("{"):
                raise ConfigError([f"--intermediate-log-config expects JSON object text, got {text[:40]!r} "
                                   "(use --intermediate-log-config-path for a file)"])
            return load_config(stripped)
        if path is not None:
            return load_config(Path(path))
        return None
    except ConfigError as exc:
        if parser is None:
            raise
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
