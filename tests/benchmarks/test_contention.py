"""benchmarks/contention.py end to end on CPU (tiny-llama, thread mode): every length gets a
row with both sides timed alone and together, and the file the simulator reads."""

from __future__ import annotations

import json

from benchmarks import contention
from benchmarks.simulator.costs import load_contention


def test_contention_cpu_end_to_end(tmp_path):
    out = tmp_path / "contention.json"
    assert contention.main(["--model", "random:tiny-llama", "--device", "cpu",
                            "--lengths", "256", "1024", "--decode-batch", "2",
                            "--decode-context", "128", "--decode-steps", "8", "--repeats", "3",
                            "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "contention" and payload["mode"] == "thread"
    assert [r["prompt_tokens"] for r in payload["rows"]] == [256, 1024]
    for row in payload["rows"]:
        assert row["prefill_alone_s"] > 0 and row["prefill_with_decode_s"] > 0
        assert row["decode_step_alone_s"] > 0
        assert row["decode_steps_during_run"] >= 2  # decode really ran during the prefills
        assert row["prefill_slowdown"] == row["prefill_with_decode_s"] / row["prefill_alone_s"]
    found = load_contention(tmp_path)
    assert found.prefill_slowdown == max(1.0, payload["slowdown"]["prefill"])
