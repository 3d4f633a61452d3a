"""The package version, in a module of its own so any module can import it without a cycle.

``pyproject.toml`` reads it from here (``[tool.setuptools.dynamic]``), so it is written once.
"""

__version__ = "0.2.0.dev0"
