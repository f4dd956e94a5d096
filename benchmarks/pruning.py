"""Pruning benchmark (same as `mambaprune bench --pruning`): python benchmarks/pruning.py [--repeats N] [--json out.json]."""
import sys

from mambaprune.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--pruning", *sys.argv[1:]]))
