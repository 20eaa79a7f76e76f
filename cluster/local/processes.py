"""The processes of one local Ray node, found and stopped by their ids.

Each node is started by ``ray start`` run as the leader of a new session (``setsid``): the
GCS, raylet, dashboard, agents and every worker the raylet later forks inherit that session
id, and Ray's processes never start sessions of their own. So a node's processes are exactly
the live processes of its session, whoever else runs Ray on the machine; nothing here matches
process names (``ray stop`` would stop every Ray instance on the host).
A process is named by (pid, start time): a pid that was reused by another process after ours
exited is not ours.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessId:
    pid: int
    start_ticks: int  # /proc/<pid>/stat field 22: start time after boot, in clock ticks

    def to_list(self) -> list[int]:
        return [self.pid, self.start_ticks]

    @classmethod
    def from_list(cls, d: list[int]) -> ProcessId:
        return cls(int(d[0]), int(d[1]))


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, session id, start ticks) of ``pid``; None once it is gone."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # the command name may hold spaces and ')'
    return fields[0], int(fields[3]), int(fields[19])


def alive(process: ProcessId) -> bool:
    """The process exists, is the one we started (same start time) and is not a zombie."""
    stat = _stat(process.pid)
    return stat is not None and stat[2] == process.start_ticks and stat[0] != "Z"


def session_members(session_id: int) -> list[ProcessId]:
    """Live (non-zombie) processes of session ``session_id``."""
    members = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is not None and stat[1] == session_id and stat[0] != "Z":
            members.append(ProcessId(int(entry.name), stat[2]))
    return members


def _signal(process: ProcessId, sig: int) -> None:
    if alive(process):
        try:
            os.kill(process.pid, sig)
        except ProcessLookupError:
            pass


def stop_processes(known: list[ProcessId], session_ids: list[int], *, grace_s: float = 10.0,
                   kill_s: float = 10.0) -> list[ProcessId]:
    """SIGTERM every process of ``session_ids`` and of ``known``; SIGKILL those still alive
    after ``grace_s``; returns those that survived ``kill_s`` more (normally none).

    The sessions are scanned again on every round, so a worker forked while the node shut
    down is stopped too.
    """

    def targets() -> list[ProcessId]:
        found = {p for s in session_ids for p in session_members(s)}
        found.update(p for p in known if alive(p))
        return sorted(found, key=lambda p: p.pid)

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, kill_s)):
        deadline = time.monotonic() + wait_s
        signalled: set[ProcessId] = set()
        while (left := targets()) and time.monotonic() < deadline:
            for process in left:
                if process not in signalled:
                    _signal(process, sig)
                    signalled.add(process)
            time.sleep(0.2)
        if not left:
            return []
    return targets()
