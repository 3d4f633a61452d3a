"""The exception hierarchy of ilstore.

The library raises only these; the CLIs turn them into exit status 2 ("the user must fix
something"). Each message says what went wrong, where (file, key path or tensor key) and,
where possible, how to fix it.
"""

from __future__ import annotations

__all__ = [
    "IlstoreError",
    "ConfigError",
    "BackendError",
    "StoreError",
    "RunNotFoundError",
    "CorruptFileError",
    "UnsafePathError",
    "MissingDependencyError",
    "AmbiguousRunError",
    "require",
]


class IlstoreError(Exception):
    """Base class of every error ilstore raises on purpose."""


class ConfigError(IlstoreError, ValueError):
    """A configuration is malformed or violates the schema.

    Attributes:
        problems: one human-readable line per problem, each naming the key path.
    """

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid ilstore config{where}:\n{lines}")


class BackendError(IlstoreError):
    """An unknown backend name, a broken plug-in or invalid backend options."""


class StoreError(IlstoreError):
    """Reading or writing a run failed."""


class RunNotFoundError(StoreError, FileNotFoundError):
    """A run directory is missing, or is not a run any backend can open."""


class CorruptFileError(StoreError):
    """A file of a run is truncated, corrupt, or would need unsafe unpickling."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class UnsafePathError(StoreError):
    """A name or a file reference would resolve outside the run directory."""


class AmbiguousRunError(StoreError):
    """A directory given as a run holds several runs; the message lists them.

    Attributes:
        directory: the directory given.
        runs: the run directories found inside.
    """

    def __init__(self, directory: object, runs: list[str]) -> None:
        self.directory = str(directory)
        self.runs = list(runs)
        listing = "\n".join(f"  - {r}" for r in self.runs)
        super().__init__(f"{self.directory}: holds {len(self.runs)} runs; pass one of them:\n{listing}")


class MissingDependencyError(IlstoreError, ImportError):
    """A feature needs an optional dependency that is not installed; the message names the extra."""


def require(module: str, feature: str, extra: str) -> object:
    """Import an optional dependency, or raise :class:`MissingDependencyError` saying how to get it.

    Example:
        >>> require("json", "the demo", "hf").__name__
        'json'
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{feature} needs the Python package {module!r}, which is not installed ({exc}); "
            f"install it with: pip install 'ilstore[{extra}]'") from None
