"""MLproject entry point `tune`: see `spatial_factorization tune --help`."""

import sys
from pathlib import Path

# Import the package from this checkout, also in an environment where it is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sf_mlflow.cli import console  # noqa: E402

if __name__ == "__main__":
    console(["tune", *sys.argv[1:]])
