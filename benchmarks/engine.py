"""Engine benchmark (same as `mambaprune bench`): python benchmarks/engine.py [--quick] [--json out.json]."""
import sys

from mambaprune.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
