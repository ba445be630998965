"""Tasks that ship with Conveyor, callable by reference from any client."""

from __future__ import annotations

import codecs
import locale
import os
import selectors
import subprocess
import sys
import time
from typing import Any, NoReturn, TextIO

READ_SIZE = 65536


def shell(command: str, timeout: float | None = None) -> dict[str, Any]:
    """Run a shell command on the worker; return its exit code, stdout and stderr.

    What the command writes also goes to this task's own stdout and stderr as it comes, so the worker
    captures it as the job's output in every mode (`conveyor logs JOB_ID --follow` shows it live). On a
    timeout the command is killed and subprocess.TimeoutExpired raised, as subprocess.run does.
    """
    proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    deadline = None if timeout is None else time.monotonic() + timeout
    got: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
    live = {
        proc.stdout.fileno(): ("stdout", codecs.getincrementaldecoder("utf-8")("replace")),
        proc.stderr.fileno(): ("stderr", codecs.getincrementaldecoder("utf-8")("replace")),
    }
    with selectors.DefaultSelector() as sel, proc:
        for f in (proc.stdout, proc.stderr):
            sel.register(f, selectors.EVENT_READ)
        while sel.get_map():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                _timed_out(proc, command, timeout, list(got.values()))
            for key, _ in sel.select(remaining):
                data = os.read(key.fd, READ_SIZE)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                got[key.fd].append(data)
                name, decoder = live[key.fd]
                _tee(name, decoder.decode(data))
        for name, decoder in live.values():
            _tee(name, decoder.decode(b"", final=True))
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            code = proc.wait(remaining)
        except subprocess.TimeoutExpired:
            _timed_out(proc, command, timeout, list(got.values()))
        out, err = (_text(b"".join(got[fd])) for fd in (proc.stdout.fileno(), proc.stderr.fileno()))
    return {"exit_code": code, "stdout": out, "stderr": err}


def _tee(name: str, text: str) -> None:
    """Write to the task's own stream (looked up now: the worker routes it to the job's output)."""
    if not text:
        return
    stream: TextIO = sys.stdout if name == "stdout" else sys.stderr
    stream.write(text)
    stream.flush()


def _text(data: bytes) -> str:
    """Decoded as subprocess.run(text=True) decodes: the locale's encoding, universal newlines."""
    encoding = "utf-8" if sys.flags.utf8_mode else locale.getencoding()
    return data.decode(encoding).replace("\r\n", "\n").replace("\r", "\n")


def _timed_out(proc: subprocess.Popen[bytes], command: str, timeout: float | None, got: list[list[bytes]]) -> NoReturn:
    proc.kill()
    proc.wait()
    out, err = (b"".join(chunks) for chunks in got)
    raise subprocess.TimeoutExpired(command, timeout or 0.0, output=out, stderr=err)
