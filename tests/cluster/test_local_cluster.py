"""The app on a real multi-node Ray cluster (``cluster/local/``: a head and two workers on this
machine, each its own raylet and object store), driven through its CLI as a user would.

Prefill and decode land on their node types (asserted from Serve's replica details and from
Ray's actor, node and placement-group tables), a streamed completion gives the engine's greedy
text with its KV moved across nodes (the backend and bytes the response reports), and ``stop``
leaves no process of the cluster behind. The fixture stops the cluster by its process ids on
every exit path, a failed test included.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import REPO_ROOT, embedded_model_dir
from transformers import AutoTokenizer

from cluster.local.nodes import ClusterState, cluster_processes, stop_cluster
from cluster.local.processes import ProcessId, alive
from disagg.generate import SimpleGenerator
from disagg.models.loader import ModelSource, load_model
from disagg.sampling import SamplingParams

MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 16
# ~450 tokens: its prefill on decode would pause decoding past max_decode_stall_s (1 s by the CPU
# cost model, ~2 s here), so the router sends it to the prefill node.
PROMPT = " ".join(["The sea was calm, and the small boat sailed home under a red sky."] * 30)


def cli(command: str, state_dir: Path) -> list[str]:
    return [sys.executable, "-m", "cluster.local", command, "--state", str(state_dir)]


def run(command: str, state_dir: Path, timeout_s: float) -> str:
    result = subprocess.run(cli(command, state_dir), check=False, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, f"{command}: {result.stdout}\n{result.stderr[-4000:]}"
    return result.stdout


def _stop_if_running(state_dir: Path) -> None:
    """The safety net: whatever happened, no process of this cluster outlives the module."""
    if not (state_dir / "state.json").exists():
        return
    state = ClusterState.load(state_dir)
    survivors = stop_cluster(state, grace_s=5.0)
    assert not survivors, f"processes of the local cluster survived SIGKILL: {survivors}"


def _greedy_reference() -> tuple[list[int], str]:
    """Token ids and greedy text of PROMPT from the engine in this process."""
    path = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(PROMPT)["input_ids"]  # as the ingress tokenizes a text completion
    generator = SimpleGenerator(load_model(ModelSource(name=MODEL, path=path)))
    out = list(generator.generate(ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)))
    return ids, tokenizer.decode(out, skip_special_tokens=True)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """(state dir, greedy reference): the reference is computed while Serve builds the app."""
    state_dir = tmp_path_factory.mktemp("local-cluster")
    deploying = None
    try:
        run("start", state_dir, timeout_s=400)
        deploying = subprocess.Popen(cli("deploy", state_dir), cwd=REPO_ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        reference = _greedy_reference()
        out, err = deploying.communicate(timeout=540)
        assert deploying.returncode == 0, f"deploy: {out}\n{err[-4000:]}"
        yield state_dir, reference
    finally:
        if deploying is not None and deploying.poll() is None:
            deploying.kill()
            deploying.wait()
        _stop_if_running(state_dir)


@pytest.fixture(scope="module")
def cluster(deployed):
    return deployed[0]


def test_prefill_and_decode_replicas_run_on_their_own_nodes(cluster):
    status = json.loads(run("status", cluster, timeout_s=120))
    replicas = {}
    for r in status["replicas"]:
        assert r["deployment"] not in replicas, f"one replica per deployment: {status}"
        replicas[r["deployment"]] = r
    prefill, decode = replicas["PrefillServer"], replicas["DecodeServer"]
    for r in replicas.values():  # Serve's view and Ray's actor table agree
        assert r["serve_node_id"] == r["ray_node_id"], r
    assert prefill["ray_node_id"] != decode["ray_node_id"]
    assert prefill["node_resources"] == {"prefill": 1.0}  # the prefill node type
    assert decode["node_resources"] == {"decode": 1.0}
    # whole_node: the replica sits in a placement group of its own, one bundle (sp = 1) that
    # took the prefill node's marker resource, placed on that node.
    assert prefill["placement_group_id"] is not None
    assert prefill["bundle_resources"] == [{"CPU": 0.5, "prefill": 1.0}]
    assert prefill["bundle_node_ids"] == [prefill["ray_node_id"]]
    assert decode["placement_group_id"] is None
    nodes = {n["name"]: n for n in status["nodes"]}
    assert set(nodes) == {"head", "prefill", "decode"}


def test_streamed_completion_has_the_greedy_text_and_its_kv_crossed_nodes(deployed):
    cluster, (ids, expected) = deployed
    state = ClusterState.load(cluster)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    chunks = []
    with httpx.stream("POST", f"http://127.0.0.1:{state.http_port}/v1/completions", json=body,
                      timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["x-disagg-path"] == "disaggregated"
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == expected
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens"] == len(ids)
    timing = usage["disagg_timing"]
    # Prefill (prefill node) published each layer's K/V to its object store; decode (the other
    # node, test above) pulled them into its pool: the only cross-node backend on CPU here.
    assert timing["kv_backend"] == "object_store"
    assert not timing["kv_recomputed"]
    config = ModelSource(name=MODEL, path=embedded_model_dir()).model_config()
    per_token = config.num_layers * 2 * config.num_kv_heads * config.head_dim * 4  # fp32 K, V
    assert timing["kv_bytes"] == len(ids) * per_token


def test_stop_leaves_no_process_of_the_cluster(cluster):
    state = ClusterState.load(cluster)
    before = cluster_processes(state)
    assert before, "the cluster has processes while it runs"
    recorded = [ProcessId.from_list(p) for n in state.nodes for p in n.processes]
    assert run("stop", cluster, timeout_s=180).strip().endswith("is left")
    assert cluster_processes(state) == []
    assert not [p for p in before + recorded if alive(p)]
    # Nothing else on the machine runs from this cluster's session directory either.
    leftovers = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if state.ray_temp_dir.encode() in cmdline.read_bytes():
                leftovers.append(cmdline.parent.name)
        except OSError:
            continue
    assert leftovers == []
    assert not (cluster / "state.json").exists()
