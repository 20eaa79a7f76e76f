"""The embedded model is built once, under a lock, and appears atomically."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from helpers import embedded_model_dir

from disagg.models.config import ModelConfig
from disagg.models.embedded import EMBEDDED_MODEL, find_gguf

BUILDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from disagg.models.embedded import build_once

    def fake_build(tmp):  # a test fake standing in for the GGUF conversion
        with open(sys.argv[2], "a") as log:
            log.write("built\\n")
        time.sleep(1.0)
        (tmp / "config.json").write_text("{}")

    print(build_once(Path(sys.argv[1]), fake_build))
""")


def test_concurrent_builders_build_once_and_agree(tmp_path):
    dest, log = tmp_path / "cache" / "model", tmp_path / "log"
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(dest), str(log)],
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outputs == [str(dest)] * 3
    assert log.read_text() == "built\n"
    assert (dest / "config.json").exists()
    assert [p.name for p in dest.parent.iterdir() if p.name.startswith(".model.") and
            p.is_dir()] == []  # no temporary directory left behind


def test_embedded_model_is_the_gguf_dequantized_to_fp32():
    path = embedded_model_dir()
    assert path.name == EMBEDDED_MODEL
    assert find_gguf().suffix == ".gguf"
    config = ModelConfig.from_dir(path)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (30, 9, 3, 64)
    assert config.tie_word_embeddings and config.max_context_tokens == 8192
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (no dict)
    assert dtypes == {"F32"}
