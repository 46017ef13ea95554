"""The benchmark harness (``scripts/bench``): outside the installed library, run from the repository."""
