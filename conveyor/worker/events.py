"""The vocabulary of the worker's state machine (state.py): the events it is fed and the actions it returns.

Events are what happened: a message from the dispatcher (already decoded and checked at the edge), an
outcome from the mode, a connection made or lost, a signal, a timer. Actions are what the socket loop
(server.py) must do: send a message, hand tasks to the mode, stop or withdraw one there, arm a timer,
finish. All of them are frozen and slotted; none holds a socket, a loop or a lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from conveyor.protocol import Cmd
from conveyor.worker.execution import Key, Outcome, Task

# --- events ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """A new connection to the dispatcher: a new socket, or the same socket whose TCP connection ZeroMQ
    re-established (a handshake after the first). `session` is its new id."""

    session: str


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The socket is closed: the dispatcher went silent for too long, or said SHUTDOWN."""


@dataclass(frozen=True, slots=True)
class Assigned:
    """ASSIGN: tasks to run, and the highest RESULTS number the dispatcher has applied."""

    tasks: Sequence[Task]
    ack: int


@dataclass(frozen=True, slots=True)
class CancelRequested:
    """CANCEL: stop this attempt (or never start it)."""

    key: Key


@dataclass(frozen=True, slots=True)
class Beat:
    """The dispatcher's HEARTBEAT: its instance id, and `ack` as in ASSIGN (None in the answer to a READY)."""

    instance: str
    ack: int | None


@dataclass(frozen=True, slots=True)
class ReconnectRequested:
    """RECONNECT: the dispatcher does not know this worker (it restarted, or declared it lost)."""


@dataclass(frozen=True, slots=True)
class ResendRequested:
    """RESEND: RESULTS from `seq` on never arrived."""

    seq: int


@dataclass(frozen=True, slots=True)
class TasksEnded:
    """The mode reports tasks that ended by themselves (success, exception, a crashed child)."""

    outcomes: Sequence[Outcome]


@dataclass(frozen=True, slots=True)
class Withdrawn:
    """The answer to a Withdraw action: the keys the mode gave back (the others had started)."""

    keys: Sequence[Key]


@dataclass(frozen=True, slots=True)
class SlotLent:
    """A running task blocks waiting on a child (conveyor.current_client()): its slot is lent meanwhile."""

    key: Key


@dataclass(frozen=True, slots=True)
class SlotBack:
    """That wait is over: the task holds its slot again."""

    key: Key


@dataclass(frozen=True, slots=True)
class StopRequested:
    """SIGTERM or SIGINT: drain; a second one moves the drain deadline to now."""


@dataclass(frozen=True, slots=True)
class Tick:
    """A timer the state asked for (ArmTimer) fired; the state looks at every deadline."""


Event: TypeAlias = (
    Connected
    | Disconnected
    | Assigned
    | CancelRequested
    | Beat
    | ReconnectRequested
    | ResendRequested
    | TasksEnded
    | Withdrawn
    | SlotLent
    | SlotBack
    | StopRequested
    | Tick
)

# --- actions --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send one message to the dispatcher (only ever returned while connected)."""

    cmd: Cmd
    body: Any
    frames: Sequence[Any] = ()


@dataclass(frozen=True, slots=True)
class SendReports:
    """Send the running tasks' pending OUTPUT and PROGRESS now, these tasks' last ones included: they have
    their outcome (the RESULTS that follows carries it), so what they write from now on is dropped."""

    finished: Sequence[Key]


@dataclass(frozen=True, slots=True)
class Start:
    """Hand these tasks to the mode, in this order (it starts them as its slots free up)."""

    tasks: Sequence[Task]


@dataclass(frozen=True, slots=True)
class Stop:
    """Interrupt this task in the mode (a timeout, a cancel, the drain deadline), or keep it from starting.
    Its outcome is already decided: the mode reports nothing more for it."""

    key: Key
    reason: BaseException


@dataclass(frozen=True, slots=True)
class Withdraw:
    """Take these tasks back from the mode's queue if they have not started; answer with Withdrawn."""

    keys: Sequence[Key]


@dataclass(frozen=True, slots=True)
class ArmTimer:
    """Feed Tick at this time (loop clock), or sooner: an earlier timer replaces a later one."""

    at: float


@dataclass(frozen=True, slots=True)
class Log:
    """A line for the worker's log."""

    level: int
    message: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The drain is over: close the socket, stop the mode, exit 0."""


Action: TypeAlias = Send | SendReports | Start | Stop | Withdraw | ArmTimer | Log | Finished
