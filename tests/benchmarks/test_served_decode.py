"""benchmarks/served_decode.py's wait between app starts: the next start waits until the GPU
memory the last app's replicas held is free again, and no longer than its bound."""

from __future__ import annotations

from benchmarks.served_decode import wait_for_device_memory

GIB = 1 << 30


def test_the_next_start_waits_until_the_last_apps_memory_is_free():
    readings = iter([10 * GIB, 30 * GIB, 69 * GIB, 70 * GIB])  # replicas exiting one by one
    sleeps = []
    wait_for_device_memory(70 * GIB, slack_bytes=2 * GIB,
                           mem_get_info=lambda: (next(readings), 80 * GIB), sleep=sleeps.append)
    assert len(sleeps) == 2  # 10 and 30 GiB free: wait; 69 GiB is within the slack


def test_memory_that_never_comes_back_waits_only_the_bound():
    sleeps = []
    waited = wait_for_device_memory(70 * GIB, timeout_s=0.05, mem_get_info=lambda: (0, 80 * GIB),
                                    sleep=lambda s: sleeps.append(s))
    assert sleeps and waited >= 0.05
