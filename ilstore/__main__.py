"""``python -m ilstore`` is the ``ilstore`` command."""

from .cli import main

if __name__ == "__main__":
    main()
