"""``python -m disagg``: command-line entry points.

- ``generate``: a raw completion (no chat template) streamed to stdout; ``--json`` prints one
  object with the token ids and text instead; speed goes to stderr.
- ``prepare-model``: converts the embedded model into the cache (``make`` runs it once).
- ``probe-layers``: the TriangleMix layer probe (``disagg.fidelity.probe``): per-layer scores
  and the recommended Triangle layers, as JSON on stdout.

The environment is read here, at the edge, and nowhere deeper: ``DISAGG_CACHE_DIR`` names the
model cache (default ``~/.cache/disagg``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from disagg.errors import DisaggError, InvalidRequestError
from disagg.models.embedded import EMBEDDED_MODEL

DEFAULT_CLI_MAX_TOKENS = 128


def default_cache_dir() -> Path:
    return Path(os.environ.get("DISAGG_CACHE_DIR", Path.home() / ".cache" / "disagg"))


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError("token ids must be integers, comma- or space-separated")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m disagg", description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache directory")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="raw completion of a prompt")
    gen.add_argument("--model", default=EMBEDDED_MODEL,
                     help=f"{EMBEDDED_MODEL} (default), random:<config>, or a local HF directory")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-token-ids", type=_token_ids,
                        help="prompt as token ids (required for random-weight models)")
    gen.add_argument("--max-tokens", type=int, default=DEFAULT_CLI_MAX_TOKENS,
                     help=f"tokens to generate (default {DEFAULT_CLI_MAX_TOKENS})")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--disaggregated", action="store_true",
                     help="prefill engine -> KV hand-off -> decode engine (in one process)")
    gen.add_argument("--trianglemix", action="store_true",
                     help="TriangleMix prefill with the model's published or default split")
    gen.add_argument("--json", action="store_true", help="print one JSON object at the end")
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")

    sub.add_parser("prepare-model", help=f"convert the embedded {EMBEDDED_MODEL} into the cache")

    probe = sub.add_parser("probe-layers", help="gradient probe: which layers can be Triangle")
    probe.add_argument("--model", default=EMBEDDED_MODEL,
                       help=f"{EMBEDDED_MODEL} (default), random:<config>, or a local HF directory")
    probe.add_argument("--num-triangle-layers", type=int, default=None,
                       help="size of the recommended set (default: half the layers)")
    probe.add_argument("--num-prompts", type=int, default=16)
    probe.add_argument("--prompt-tokens", type=int, default=2048)
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    probe.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cache_dir = args.cache_dir or default_cache_dir()
    try:
        if args.command == "prepare-model":
            from disagg.models.embedded import prepare_embedded

            print(prepare_embedded(cache_dir))
            return 0
        if args.command == "probe-layers":
            return _run_probe(args, cache_dir)
        from disagg.generate_cli import run_generate

        return run_generate(args, cache_dir)
    except DisaggError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run_probe(args: argparse.Namespace, cache_dir: Path) -> int:
    import json

    import torch
    from disagg_kernels.triangle_mix import TriangleParams

    from disagg.fidelity.probe import build_probe_model, probe_layers, retrieval_prompts
    from disagg.models.loader import resolve_model

    source = resolve_model(args.model, cache_dir=cache_dir)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    hf = build_probe_model(source, device)
    prompts = retrieval_prompts(source, args.prompt_tokens, args.num_prompts, args.seed)
    result = probe_layers(hf, prompts, TriangleParams(), model_name=source.name, progress=True)
    count = args.num_triangle_layers or hf.config.num_hidden_layers // 2
    text = json.dumps(result.to_dict(count), indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


def check_text_prompt(prompt: str | None, has_tokenizer: bool, model: str) -> None:
    if prompt is not None and not has_tokenizer:
        raise InvalidRequestError(
            f"model {model!r} has random weights and no tokenizer: pass --prompt-token-ids"
        )


if __name__ == "__main__":
    sys.exit(main())
