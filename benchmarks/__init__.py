"""Benchmarks that write the results pages under docs/results/.

Run one as ``fedimb bench NAME [ARGS]`` or ``python -m benchmarks.NAME [ARGS]`` from the
repository root; ``--help`` lists its options. docs/results/README.md lists every page and the
command that made it.
"""
