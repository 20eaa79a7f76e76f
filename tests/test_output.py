"""The per-request output processor: incremental text, stop strings, finish reasons, logprobs."""

from __future__ import annotations

import pytest
from helpers import embedded_model_dir
from transformers import AutoTokenizer

from disagg.errors import InvalidRequestError
from disagg.output import OutputProcessor
from disagg.sampling import SampledToken, SamplingParams


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded_model_dir())


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def held_back(decoded: str, stops: tuple[str, ...]) -> str:
    """What may be emitted of ``decoded``: all but its longest tail that starts a stop string."""
    for i in range(len(decoded)):
        if any(s.startswith(decoded[i:]) for s in stops):
            return decoded[:i]
    return decoded


def feed(tokenizer, text: str, stops: tuple[str, ...], finish_reason: str = "length"):
    proc = OutputProcessor(tokenizer, SamplingParams(stop=stops))
    ids = ids_of(tokenizer, text)
    deltas = []
    for i, t in enumerate(ids):
        delta = proc.push(SampledToken(t), finish_reason if i == len(ids) - 1 else None)
        deltas.append(delta)
        assert "\ufffd" not in delta.text
        decoded = tokenizer.decode(ids[:i + 1])
        if not delta.finished and not decoded.endswith("\ufffd"):
            # Exactly the text that can no longer become a stop string has been emitted.
            assert proc.text == held_back(decoded, stops)
        if delta.finished:
            break
    return proc, deltas


@pytest.mark.parametrize("text,stops,expected", [
    ("Once upon a time the end came.", ("the end",), "Once upon a time "),
    ("Once upon a time the cat sat.", ("the end",), "Once upon a time the cat sat."),
    ("alpha beta gamma delta", ("gamma", "beta g", "zeta"), "alpha "),
    ("Question: what?\nAnswer: yes\nQuestion: why?", ("\nQuestion:",),
     "Question: what?\nAnswer: yes"),
])
def test_stop_strings_are_held_back_and_excluded_across_token_boundaries(
        tokenizer, text, stops, expected):
    proc, deltas = feed(tokenizer, text, stops)
    assert "".join(d.text for d in deltas) == expected == proc.text
    matched = expected != text
    assert deltas[-1].finished
    assert deltas[-1].finish_reason == ("stop" if matched else "length")
    # Token ids include the one that completed the stop string.
    assert [t for d in deltas for t in d.token_ids] == proc.token_ids


def test_stop_string_spanning_several_tokens(tokenizer):
    stop = " we will meet again"
    assert len(ids_of(tokenizer, stop)) >= 3
    proc, _ = feed(tokenizer, "Goodbye, friend; we will meet again soon.", (stop,))
    assert proc.text == "Goodbye, friend;" and proc.finish_reason == "stop"
    assert len(proc.token_ids) < len(ids_of(tokenizer, "Goodbye, friend; we will meet again soon."))


def test_engine_finish_flushes_held_back_text(tokenizer):
    proc, deltas = feed(tokenizer, "It was the", ("the end",), finish_reason="length")
    assert proc.text == "It was the" and deltas[-1].text.endswith("the")
    assert deltas[-1].finish_reason == "length"


def test_no_replacement_character_is_ever_emitted(tokenizer):
    text = "Grüße, 你好世界 🎉🚀 naïve café — the end"
    proc, deltas = feed(tokenizer, text, ("🚀",))
    assert proc.text == "Grüße, 你好世界 🎉" and proc.finish_reason == "stop"
    proc, deltas = feed(tokenizer, text, ())
    assert proc.text == text and all("\ufffd" not in d.text for d in deltas)


def test_incomplete_utf8_at_the_end_is_dropped_not_emitted(tokenizer):
    ids = ids_of(tokenizer, "ok 🎉")
    proc = OutputProcessor(tokenizer, SamplingParams())
    deltas = [proc.push(SampledToken(t)) for t in ids[:-1]]  # the emoji's bytes are cut short
    deltas.append(proc.push(None, "length"))
    assert all("\ufffd" not in d.text for d in deltas) and proc.text.strip() == "ok"


def test_logprobs_are_passed_through(tokenizer):
    params = SamplingParams(logprobs=2)
    proc = OutputProcessor(tokenizer, params)
    token = SampledToken(42, -0.5, ((42, -0.5), (7, -1.5)))
    delta = proc.push(token)
    assert delta.logprobs == (token,) and delta.token_ids == (42,)
    assert proc.logprobs == [token]
    plain = OutputProcessor(tokenizer, SamplingParams())
    assert plain.push(SampledToken(42)).logprobs == ()


def test_finish_without_a_token_and_pushes_after_the_end(tokenizer):
    proc = OutputProcessor(tokenizer, SamplingParams())
    proc.push(SampledToken(ids_of(tokenizer, "Hi")[0]))
    end = proc.push(None, "error")
    assert end.finished and end.finish_reason == "error" and end.token_ids == ()
    late = proc.push(SampledToken(5))
    assert late.text == "" and late.token_ids == () and late.finished
    assert proc.token_ids == ids_of(tokenizer, "Hi")


def test_token_id_models_have_no_text_and_no_stop_strings():
    proc = OutputProcessor(None, SamplingParams())
    delta = proc.push(SampledToken(9), "length")
    assert delta.text == "" and delta.token_ids == (9,) and delta.finish_reason == "length"
    with pytest.raises(InvalidRequestError):
        OutputProcessor(None, SamplingParams(stop=("x",)))
