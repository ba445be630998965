"""`python -m benchmarks`: see benchmarks/cli.py for the options."""

from benchmarks.cli import main

if __name__ == "__main__":  # not in the interpreters each sample runs in (spawned: they import this module)
    raise SystemExit(main())
