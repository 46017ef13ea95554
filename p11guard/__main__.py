import sys

from p11guard.cli import main

if __name__ == "__main__":  # a spawned child (Dask's local workers) imports this module too
    sys.exit(main())
