"""`conveyor demo`: measured experiments on processes, threads, asyncio and the GIL, run on Conveyor itself.

- tasks.py        the task functions the workers import (conveyor.demo.tasks:NAME)
- harness.py      sizes, local clusters, timing, psutil sampling
- experiments.py  behaviour: copies of variables (1), races and locks (2), crashes (8), the interpreter (10)
- performance.py  speed and cost: GIL and scaling (3-5), hosts (6), cost of a worker (7), waiting (9)
- subinterpreters.py  interpreters mode beside threads and processes, free-threaded Pythons found (11)
- runner.py       runs them all into one results dict
- report.py, report_perf.py, text.py, plots.py   report.md, results.json and the PNG plots
- cli.py          the `conveyor demo` command

Keep this module free of imports: the CLI (conveyor/cli/demo.py) is imported at every start-up.
"""
