"""The ``generate`` CLI: streamed text, --json, and clear errors (no traceback) on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO_ROOT, embedded_model_dir, random_model
from transformers import AutoTokenizer

from disagg.generate import SimpleGenerator
from disagg.sampling import SamplingParams


def run_cli(*args: str) -> subprocess.CompletedProcess:
    embedded_model_dir()  # the cache is prepared; the CLI must not convert on its own here
    return subprocess.run(
        [sys.executable, "-m", "disagg", "generate", *args],
        check=False, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
    )


def test_streams_only_the_completion_text_to_stdout():
    result = run_cli("--prompt", "Water boils at", "--max-tokens", "12")
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    json_result = run_cli("--prompt", "Water boils at", "--max-tokens", "12", "--json")
    payload = json.loads(json_result.stdout)
    assert len(payload["token_ids"]) == 12
    expected = tokenizer.decode(payload["token_ids"], skip_special_tokens=True)
    assert payload["text"] == expected
    assert result.stdout == expected + "\n"
    assert "tok/s" in result.stderr and "tok/s" not in result.stdout


def test_json_token_ids_match_the_engine_on_a_random_model():
    result = run_cli("--model", "random:tiny-llama", "--prompt-token-ids", "5,6,7,8,9",
                     "--max-tokens", "8", "--ignore-eos", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    model, _ = random_model("tiny-llama")
    expected = list(SimpleGenerator(model).generate(
        [5, 6, 7, 8, 9], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)))
    assert payload["token_ids"] == expected
    assert payload["text"] is None


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "hello " * 9000], "context"),
    (["--model", "random:tiny-llama", "--prompt-token-ids", ",".join(["3"] * 4000),
      "--max-tokens", "200"], "exceeds"),
    (["--prompt", "hi", "--max-tokens", "0"], "max_tokens must be at least 1"),
    (["--model", "no-such-model", "--prompt", "hi"], "no-such-model"),
    (["--model", "random:nope", "--prompt-token-ids", "1"], "unknown random config"),
    (["--model", "random:tiny-llama", "--prompt", "hi"], "--prompt-token-ids"),
    (["--model", "random:tiny-llama", "--prompt-token-ids", "1,99999"], "outside the vocabulary"),
    (["--prompt-token-ids", "1,x"], "token ids must be integers"),
])
def test_bad_input_gives_a_clear_error_and_nonzero_exit(args, message):
    result = run_cli(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
