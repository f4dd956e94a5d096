"""``python -m mambaprune.planner``: the same as ``mambaprune plan``."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
