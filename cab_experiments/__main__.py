"""``python -m cab_experiments``: the experiments' command line (cab_experiments.cli), run from a checkout."""

import sys

from cab_experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
