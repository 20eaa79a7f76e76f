"""The local cluster's processes are found by session and stopped by pid, and a start that
fails leaves nothing behind (a fake ``ray`` executable stands in for Ray here)."""

from __future__ import annotations

import os
import stat
import subprocess
import time

import pytest

from cluster.local import nodes
from cluster.local.nodes import ClusterStartError, NodeSpec, start_cluster
from cluster.local.processes import alive, session_members, stop_processes


def _wait_for(condition, deadline_s: float = 10.0):
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.05)


def test_a_session_is_found_whole_and_stopped_even_a_child_that_ignores_sigterm():
    leader = subprocess.Popen(
        ["bash", "-c", "(trap '' TERM; exec sleep 300) & sleep 300 & wait"],
        start_new_session=True)
    try:
        _wait_for(lambda: len(session_members(leader.pid)) == 3)  # bash + two sleeps
        members = session_members(leader.pid)
        assert leader.pid in {p.pid for p in members}
        survivors = stop_processes([], [leader.pid], grace_s=1.0, kill_s=5.0)
        assert survivors == []
        leader.wait(5)
        assert session_members(leader.pid) == []
        assert not any(alive(p) for p in members)
    finally:
        if leader.poll() is None:
            os.killpg(leader.pid, 9)


def test_a_failed_start_stops_what_it_started(tmp_path, monkeypatch):
    pids = tmp_path / "pids"
    fake = tmp_path / "fake-ray"  # a `ray start` that leaves a process behind, then fails
    fake.write_text(f"#!/bin/bash\necho $$ >> {pids}\n(sleep 300 &)\necho boom >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(nodes, "ray_executable", lambda: str(fake))
    state_dir = tmp_path / "state"
    with pytest.raises(ClusterStartError, match="boom"):
        start_cluster(state_dir, (NodeSpec("head", 1),), timeout_s=30)
    sessions = [int(p) for p in pids.read_text().split()]
    assert len(sessions) == 2  # the failed node was stopped, then tried once more
    assert all(session_members(s) == [] for s in sessions)
    assert not (state_dir / "state.json").exists()
    assert not (state_dir / "auth_token").exists()
