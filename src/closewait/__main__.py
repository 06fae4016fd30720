"""``python -m closewait``: the same as the ``closewait`` console script.

Useful where the script is not on PATH, or to run closewait with a chosen interpreter (for example
a system python3 with PYTHONPATH pointing at the package, as another user).
"""

from closewait.cli import main

if __name__ == "__main__":
    main()
