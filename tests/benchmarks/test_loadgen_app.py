"""A seconds-long run of the load generator (``python -m benchmarks.serve``) against the real
CPU app (``random:tiny-llama``, one Serve app for the module): every field of the report comes
from real responses."""

from __future__ import annotations

import asyncio
import json

import pytest
from helpers import own_serve_app

from benchmarks import serve as serve_cli
from benchmarks.loadgen.client import RequestSpec
from benchmarks.loadgen.report import summarize
from benchmarks.loadgen.runner import RunConfig, run
from benchmarks.loadgen.workload import WorkItem

LOCAL_PREFILL_MAX_TOKENS = 40
MODEL = "random:tiny-llama"


@pytest.fixture(scope="module")
def app_url():
    from deployments.config import AppConfig

    config = AppConfig(model=MODEL, local_prefill_max_tokens=LOCAL_PREFILL_MAX_TOKENS,
                       health_check_period_s=1.0)
    with own_serve_app(config, "bench") as url:
        yield url


def test_cli_run_reports_what_the_server_streamed(app_url, tmp_path):
    out = tmp_path / "serve_ci.json"
    code = serve_cli.main([
        "--base-url", app_url, "--setup", "ci", "--num-requests", "10",
        "--request-rate", "20", "--prompt-len", "uniform:8:90", "--output-len", "uniform:1:6",
        "--ignore-eos", "--goodput", "ttft:60000", "--no-progress", "--out", str(out),
        "--plot-dir", str(tmp_path), "--commit", "test", "--seed", "3"])
    assert code == 0
    payload = json.loads(out.read_text())
    assert {"benchmark", "commit", "device", "versions", "rows"} <= payload.keys()
    (row,) = payload["rows"]
    assert row["completed"] == 10 and row["failed"] == 0 and row["errors_by_status"] == {}
    for r in row["requests"]:
        assert r["status"] == 200 and r["success"]
        # token counts equal what the server streamed: one chunk per token, and usage agrees
        assert r["output_tokens"] == r["usage_completion_tokens"] == r["num_token_chunks"]
        assert r["output_tokens"] == r["max_tokens"]  # ignore_eos: exactly max_tokens
        assert r["server_prompt_tokens"] == r["prompt_tokens"]
        assert len(r["itl_s"]) == r["output_tokens"] - 1
        assert 0 < r["ttft_s"] <= r["e2e_s"]
        expected = "local" if r["prompt_tokens"] < LOCAL_PREFILL_MAX_TOKENS else "disaggregated"
        assert r["path"] == expected
        if expected == "disaggregated":
            assert r["timing"]["prefill_s"] > 0 and r["timing"]["queue_s"] >= 0
    assert sum(row["paths"].values()) == 10 and len(row["paths"]) == 2  # both paths ran
    for key in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "e2el_p99_s", "itl_p50_s",
                "tpot_mean_s", "breakdown_prefill_mean_s", "goodput_rps"):
        assert row[key] is not None and row[key] >= 0, key
    assert row["total_output_tokens"] == sum(r["max_tokens"] for r in row["requests"])
    assert (tmp_path / "serve_ci_ttft_cdf.png").stat().st_size > 0


def test_real_app_errors_are_counted(app_url):
    """A text prompt to a random-weight model is a 400 from the real app; unknown model 404."""
    items = [WorkItem(i, 0.0, 5, 3) for i in range(4)]

    def spec(w):
        return RequestSpec(url=f"{app_url}/v1/completions", chat=False,
                           model=MODEL if w.index < 3 else "no-such-model",
                           prompt="hello" if w.index < 2 else [5, 6, 7, 8, 9], max_tokens=3,
                           ignore_eos=True, token_chunks="any")

    results = asyncio.run(run(items, spec, RunConfig(progress=False, timeout_s=60)))
    row = summarize(results)
    assert row["errors_by_status"] == {"400": 2, "404": 1} and row["completed"] == 1
    assert results[2].output_tokens == 3 and results[2].status == 200
