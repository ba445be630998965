"""Conveyor benchmarks: the same workloads against Conveyor and the usual alternatives.

Run from the repository root (workers import the task functions from `benchmarks.tasks`):

    python -m benchmarks                 # full sizes, medians over 3 runs
    python -m benchmarks --smoke         # tiny sizes, one run (CI)
    python -m benchmarks --only bulk_noop latency --runs 5

Every workload runs against Conveyor (one dispatcher, one worker and the client on this machine)
and, in the same run, against concurrent.futures.ProcessPoolExecutor with the same number of
slots; against dask.distributed and Ray too when they are importable. Results go to a rich table
on stdout and to benchmarks/results/<UTC timestamp>.json (and latest.json).
"""
