"""What the dispatcher knows beyond scheduling, and how people see it:

    observer.py   the Observer: task output and progress, recent jobs, snapshots (on the loop thread)
    outputs.py    the store of task output and its memory budget
    stats.py      per-function statistics and the throughput series
    metrics.py    the Prometheus endpoint
    dashboard/    the web dashboard
"""
