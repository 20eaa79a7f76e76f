"""Admission at the ingress with the CPU YAML's own settings (``deployments/prefill_decode.yaml``):
a burst of far more long prompts than the queue holds is refused at once past the bound, each
with a Retry-After that grows with the queue, while short prompts keep being admitted.

The replicas' reports are a test's (``FakeReports``); the planner, the ledger of plans in
flight and the policy are the ingress's own. SmolLM2-135M's architecture (the YAML's model)
comes from its named config, so no weights are loaded.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from deployments import load
from deployments.admission import Planner
from deployments.config import AppConfig
from disagg.models.config import ModelConfig
from disagg.models.random_configs import RANDOM_CONFIGS
from disagg.openai.errors import APIError
from disagg.request import EngineRequest
from disagg.sampling import SamplingParams

YAML = Path(__file__).parents[2] / "deployments" / "prefill_decode.yaml"
LONG, SHORT = 1500, 20


class FakeReports:
    """Test fake of what the routers would publish: one idle replica per role."""

    def __enter__(self):
        self._saved = {d: load.BOARD.reports(d) for d in ("PrefillServer", "DecodeServer")}
        load.BOARD.publish("PrefillServer", {"p0": {"at": time.time(), "queue": []}})
        load.BOARD.publish("DecodeServer", {"d0": {
            "at": time.time(), "free_blocks": 20_000, "total_blocks": 20_000, "block_size": 16,
            "max_num_seqs": 64, "active": [], "local_queue": []}})
        return self

    def measured(self, samples) -> None:
        load.BOARD.publish("PrefillServer", {"p0": {"at": time.time(), "queue": [],
                                                    "measured": [list(m) for m in samples]}})

    def __exit__(self, *exc):
        for deployment, reports in self._saved.items():
            load.BOARD.publish(deployment, reports or {})


def request(i: int, n: int) -> EngineRequest:
    return EngineRequest(f"r{i}", tuple(range(1, n + 1)), SamplingParams(max_tokens=16), 16, 0)


def test_cpu_yaml_burst_refuses_the_excess_at_once_and_keeps_serving_short_prompts():
    args = yaml.safe_load(YAML.read_text())["applications"][0]["args"]
    config = AppConfig.model_validate(args)
    assert config.routing.mode == "auto" and config.routing.max_queue_wait_s == 30.0
    planner = Planner(config, ModelConfig.from_hf_dict(RANDOM_CONFIGS["smollm2-135m"]))
    with FakeReports():
        outcomes = [planner.plan(request(i, LONG if i % 6 else SHORT)) for i in range(72)]
    long = [o for i, o in enumerate(outcomes) if i % 6]
    short = [o for i, o in enumerate(outcomes) if not i % 6]
    admitted = [o for o in long if not isinstance(o, APIError)]
    refused = [o for o in long if isinstance(o, APIError)]
    assert all(not isinstance(o, APIError) and o.plan.path == "local" for o in short)
    assert all(o.plan.path == "disaggregated" for o in admitted)
    # The queue takes what it can start within max_queue_wait_s; every other one is refused.
    per = planner.cost.prefill_s(LONG)
    assert len(admitted) == int(config.routing.max_queue_wait_s // per) + 1
    assert len(admitted) + len(refused) == len(long) and len(refused) > len(admitted)
    assert all(e.status == 429 and e.code == "queue_full" for e in refused)
    retry = [e.retry_after_s for e in refused]
    assert retry[0] >= 1 and retry == sorted(retry)  # later in the burst, later to retry
    assert all(e.headers()["Retry-After"] == str(e.retry_after_s) for e in refused)
    # Once the first admitted prompts have their first token, the queue opens again.
    for ticket in admitted[:2]:
        ticket.first_token()
    with FakeReports():
        assert not isinstance(planner.plan(request(100, LONG)), APIError)
    for ticket in admitted + short:
        ticket.end()


def test_measured_prefill_slower_than_fitted_admits_fewer():
    args = yaml.safe_load(YAML.read_text())["applications"][0]["args"]
    config = AppConfig.model_validate(args)
    planner = Planner(config, ModelConfig.from_hf_dict(RANDOM_CONFIGS["smollm2-135m"]))
    fitted = planner.fitted.prefill_s(LONG)
    with FakeReports() as reports:
        # The replica's report: its last prefills took twice the fitted time.
        reports.measured([(seq, LONG, 2 * fitted) for seq in range(1, 41)])
        outcomes = [planner.plan(request(i, LONG)) for i in range(1, 30)]
    admitted = [o for o in outcomes if not isinstance(o, APIError)]
    assert len(admitted) == int(config.routing.max_queue_wait_s // (2 * fitted)) + 1
    for ticket in admitted:
        ticket.end()
