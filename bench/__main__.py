import sys

from bench._bench import main

if __name__ == "__main__":  # a spawned child (the Dask case's local workers) imports this module too
    sys.exit(main())
