"""An app whose prefill is a sequence-parallel group of two CPU ranks (gloo), served for real:
a streamed chat request on the disaggregated path gives the same greedy text as the ``sp: 1``
app of this test session; a rank that dies gets its replica replaced by a whole new group
(``slow``); once the app is deleted no rank actor is left."""

from __future__ import annotations

import gc
import json
import time

import httpx
import pytest
import ray
from conftest import LOCAL_PREFILL_MAX_TOKENS
from helpers import embedded_model_dir
from ray import serve

from deployments.app import build_app
from deployments.config import AppConfig
from deployments.sp_group import RANK_NAMESPACE

MODEL = "smollm2-135m-instruct"
LONG = "Write two sentences about the sea, the wind, and a small boat sailing home at dusk."
APP, ROUTE = "disagg-sp2", "/sp2"

def alive_rank_actors() -> list:
    return [a for a in ray._private.state.actors().values()  # GCS view: no dashboard here
            if a["ActorClassName"] == "SPRankActor" and a["State"] == "ALIVE"]

def stream_chat(base: str) -> tuple[str, str]:
    """(x-disagg-path, the streamed text) of a greedy chat request."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": LONG}], "max_tokens": 16,
            "temperature": 0, "stream": True}
    text = []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        path = r.headers["x-disagg-path"]
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    text.append(chunk["choices"][0]["delta"].get("content") or "")
    return path, "".join(text)

@pytest.fixture(scope="module")
def sp_app(serve_app):
    config = AppConfig(cache_dir=embedded_model_dir().parent,
                       local_prefill_max_tokens=LOCAL_PREFILL_MAX_TOKENS,
                       health_check_period_s=1.0,
                       prefill={"sp": 2, "num_cpus": 0.2}, decode={"num_cpus": 0.2},
                       ingress={"num_cpus": 0.1})
    serve.run(build_app(config), name=APP, route_prefix=ROUTE)
    yield serve_app + ROUTE
    if APP in serve.status().applications:
        serve.delete(APP)

def test_sp2_streams_the_same_greedy_text_as_sp1(serve_app, sp_app):
    assert len(alive_rank_actors()) == 1  # sp - 1: the replica itself is rank 0
    sp1_path, sp1_text = stream_chat(serve_app)
    sp2_path, sp2_text = stream_chat(sp_app)
    assert sp1_path == sp2_path == "disaggregated"
    assert sp2_text == sp1_text and sp1_text


def test_every_rank_actor_froze_its_start_up_heap(sp_app):
    """Serve freezes its replicas' start-up heaps; a rank actor is no replica, so it freezes
    its own after the group's warm-up (``SPRankActor.warm_up``)."""
    (rank,) = alive_rank_actors()
    actor = ray.get_actor(rank["Name"], namespace=RANK_NAMESPACE)
    frozen = ray.get(actor.__ray_call__.remote(lambda _: gc.get_freeze_count()), timeout=30)
    assert frozen > 10_000, frozen  # torch and the model: far more than this


@pytest.mark.slow
def test_a_dead_rank_gets_its_replica_replaced_with_a_whole_new_group(serve_app, sp_app):
    (dead,) = alive_rank_actors()
    ray.kill(ray.get_actor(dead["Name"], namespace=RANK_NAMESPACE))
    deadline = time.monotonic() + 120  # health check fails, Serve starts a new replica + rank
    while True:
        ranks = alive_rank_actors()
        if ranks and all(a["ActorID"] != dead["ActorID"] for a in ranks):
            break
        assert time.monotonic() < deadline, "no new SP group after a rank died"
        time.sleep(0.5)
    assert len(ranks) == 1
    _, sp1_text = stream_chat(serve_app)
    path = text = None
    while time.monotonic() < deadline:  # the new replica may still be starting
        path, text = stream_chat(sp_app)
        if path == "disaggregated":
            break
        time.sleep(1.0)
    assert (path, text) == ("disaggregated", sp1_text)


def test_no_rank_actor_outlives_its_app(sp_app):
    assert alive_rank_actors()
    serve.delete(APP)
    deadline = time.monotonic() + 60  # liveness, not speed
    while alive_rank_actors():
        assert time.monotonic() < deadline, "an SP rank actor outlived its app"
        time.sleep(0.5)
