"""The worker: its socket loop (worker.py) and one execution mode per kind of concurrency (modes/)."""

from conveyor.worker.worker import Worker, run_worker

__all__ = ["Worker", "run_worker"]
