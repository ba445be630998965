"""`conveyor cluster up|status|down HOSTS.toml`: a dispatcher and workers on many hosts, over SSH.

The inventory (deploy/hosts.example.toml documents every key) lists the hosts, how to reach them
and how to run `conveyor` there, each host's worker mode, concurrency and tags, and where the
dispatcher runs (this machine, or one of the hosts) with its address as workers see it.

Everything runs through the system `ssh` client, so the user's keys, agent and ~/.ssh/config apply
(with BatchMode=yes: never a password prompt, and a ConnectTimeout). Each command sends a short
POSIX `sh` script to `sh -s` on the host. A worker is started detached (setsid + nohup) so it outlives
the SSH session, with a pid file and a log file in the host's state directory; `up` finds a running
worker by its pid file and process and leaves it alone, so running it twice starts nothing twice.
`down` stops workers first (SIGTERM: they drain, then exit), waits, kills what outlives the timeout,
then stops the dispatcher. Each host gets one line: started / already running / unreachable /
conveyor missing / wrong Python / failed, and for `status` running / not running plus what the
dispatcher sees.

An optional [backup] (and [witness]) makes the dispatcher a standby pair (docs/standby.md): `up`
starts the witness, the primary and the backup before the workers, which connect to both; `status`
asks each dispatcher which one is active; `down` stops both dispatchers, then the witness.

The modules, bottom up:

- ssh: Target, where a command runs (this machine or a host reached with ssh), and running a script there.
- inventory: the inventory format; load_inventory reads and checks it into Processes to run.
- remote: the sh scripts that start, check and stop a process on its host, and their Outcome.
- probe: asking one dispatcher of a pair, and only that one, whether it is active.
The typer commands (up, status, down and their per-host lines) are in conveyor/cli/cluster.py.
"""

from conveyor.cluster.inventory import Inventory, Process, load_inventory
from conveyor.cluster.remote import Outcome
from conveyor.cluster.ssh import Target
from conveyor.errors import InventoryError

__all__ = ["Inventory", "InventoryError", "Outcome", "Process", "Target", "load_inventory"]
