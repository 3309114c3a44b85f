"""``python -m molopt.cli``: the console program, as the ``molopt`` script runs it."""

from molopt.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
