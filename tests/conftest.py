"""Test-session setup shared by every test folder.

Triton kernels run under the interpreter when no CUDA GPU is present; the switch must be set
before any kernel module is imported, so it lives here, at the edge.

A run of the GPU-marked tests leaves its pass/fail summary in the JSON file named by
``DISAGG_GPU_TESTS_JSON`` (CI has no GPU; the GPU machine's runs record what they proved).
"""

from __future__ import annotations

import json
import os
import platform

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


_outcomes: dict[str, str] = {}


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _outcomes[report.nodeid] = report.outcome


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("DISAGG_GPU_TESTS_JSON")
    if not path:
        return
    failed = sorted(n for n, o in _outcomes.items() if o == "failed")
    summary = {
        "commit": os.environ.get("DISAGG_COMMIT", "unknown"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "selection": os.environ.get("DISAGG_GPU_TESTS_SELECTION", ""),
        "passed": sum(1 for o in _outcomes.values() if o == "passed"),
        "failed": len(failed),
        "skipped": sum(1 for o in _outcomes.values() if o == "skipped"),
        "failures": failed,
    }
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
