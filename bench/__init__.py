"""Benchmarks of the pipeline's hot paths (similarity at gallery sizes, region extraction, matcher training, scoring
precision, the search shortlist), each printed as tables; `bench/RESULTS.md` holds the latest record.

A package, not part of the installed `itm`: run a benchmark as a module from the repository root, inside the
virtualenv (`source .venv/bin/activate`):

    python -m bench.similarity --scale 0.1
    python -m bench.run_all --record bench/RESULTS.md    # every benchmark in turn

Each module's docstring (`python -m bench.<name> --help`) says what it measures and how; `bench.common` holds what
they share (one case per subprocess, medians, peak memory, tables, peak TFLOP/s of known GPUs).
"""
