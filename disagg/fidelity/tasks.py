"""RULER-style synthetic long-context tasks, generated offline from a seed, at an exact length.

Every sample is a chat prompt of exactly ``prompt_tokens`` tokens whose assistant turn already
holds the answer's lead-in, plus the reference answer's token ids; greedy decoding is correct
iff it emits the answer (``scoring.py`` checks that teacher-forced). Tasks (RULER's names):
- ``niah_single``: one needle ("the special magic number for <key> is <7 digits>") in a noise
  haystack, at a random depth;
- ``niah_multikey``: four needles with different keys; the question names one;
- ``kv_retrieval``: a JSON object of UUID keys and UUID values; the value of one key;
- ``variable_tracking``: ``VAR A = 12345`` and two more hops (``VAR B = VAR A``...) scattered
  in noise, RULER's question ("find all variables that are assigned the value 12345"); scored
  on the first variable listed, the one assigned the value itself (SmolLM2-135M lists one name
  and stops: full-chain recall would be 0 for dense already).
Prompts are assembled from separately tokenized pieces cut at line or sentence boundaries,
the haystack trimmed to land exactly on the length (samples of a length batch together).
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass

TASKS = ("niah_single", "niah_multikey", "kv_retrieval", "variable_tracking")
# Pieces start with a space-prefixed word and end without a space: the tokenizer's
# pre-tokenizer splits there anyway, so concatenated piece tokens are the text's own tokens.
NOISE = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
SYSTEM = "You are a helpful assistant."
ANSWER_BUDGET_TOKENS = 64  # prompt + answer stay within the bucket: prompt = bucket - this


@dataclass(frozen=True)
class TaskSample:
    task: str
    prompt_ids: list[int]
    answer_ids: list[int]
    answer_text: str


class _Builder:
    """Token-exact prompt assembly with one tokenizer (no special tokens added)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tokenizer.encode(text, add_special_tokens=False)
        return self._cache[text]

    def ids_many(self, texts: list[str]) -> list[list[int]]:
        """One batched tokenizer call (the fast tokenizers run it in parallel)."""
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def chat(self, context: list[list[int]], question: str, lead_in: str) -> tuple[list, list]:
        """(head ids, tail ids) around the context pieces: the chat template's user turn opens
        before the context; the question, the assistant turn and its lead-in follow it."""
        head = self.ids(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n")
        tail = self.ids(f"\n\n{question}<|im_end|>\n<|im_start|>assistant\n{lead_in}")
        return head, tail


def _fit(builder: _Builder, budget: int, pieces: list[list[int]], filler: Callable[[], str],
         inserts: list[tuple[float, list[int]]]) -> list[int]:
    """``budget`` tokens: filler sentences (or ``pieces`` first) with ``inserts`` placed at
    their relative depths; the filler is trimmed at the end to land exactly on ``budget``."""
    room = budget - sum(len(p) for _, p in inserts)
    body: list[list[int]] = []
    used = 0
    for piece in pieces:
        if used + len(piece) > room:
            break
        body.append(piece)
        used += len(piece)
    while used < room:
        piece = builder.ids(filler())
        body.append(piece[: room - used])
        used += len(body[-1])
    for depth, piece in sorted(inserts, key=lambda x: -x[0]):  # deepest first: indices hold
        body.insert(round(depth * len(body)), piece)
    out = [t for piece in body for t in piece]
    assert len(out) == budget, (len(out), budget)
    return out


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randrange(10 ** (n - 1), 10**n))


def _word(rng: random.Random) -> str:
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po", "da", "fu"]
    return "".join(rng.choice(syllables) for _ in range(3))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _niah(builder, rng, budget, num_keys):
    keys = list(dict.fromkeys(_word(rng) for _ in range(num_keys * 2)))[:num_keys]
    values = [_digits(rng, 7) for _ in keys]
    target = rng.randrange(num_keys)
    question = (f"What is the special magic number for {keys[target]} mentioned in the "
                "provided text?")
    lead_in = f"The special magic number for {keys[target]} mentioned in the provided text is"
    head, tail = builder.chat([], question, lead_in)
    needles = [(rng.random(), builder.ids(f" One of the special magic numbers for {k} is: {v}."))
               for k, v in zip(keys, values)]
    body = _fit(builder, budget - len(head) - len(tail), [], lambda: NOISE, needles)
    return head + body + tail, " " + values[target]


def _kv_retrieval(builder, rng, budget):
    pairs = [(_uuid(rng), _uuid(rng)) for _ in range(budget // 40 + 2)]
    lines = builder.ids_many([f'\n  "{k}": "{v}",' for k, v in pairs])
    opening, close = builder.ids(" JSON data:\n{"), builder.ids("\n}")
    head, _ = builder.chat([], "", "")
    lead_in = 'The value is "'
    tails = builder.ids_many([f"\n\nWhat is the value associated with the key {k} in the JSON "
                              f"object above?<|im_end|>\n<|im_start|>assistant\n{lead_in}"
                              for k, _ in pairs])
    fixed = len(head) + len(opening) + len(close)
    room = budget - fixed - max(len(t) for t in tails)
    body, used = [], 0
    for line in lines:
        if used + len(line) > room:
            break
        body.append(line)
        used += len(line)
    target = rng.randrange(len(body))  # any pair that made it into the object
    # A few noise tokens before the object land the prompt on the exact length.
    pad = _fit(builder, budget - fixed - len(tails[target]) - used, [], lambda: NOISE, [])
    context = pad + opening + [t for line in body for t in line] + close
    return head + context + tails[target], pairs[target][1]


def _variable_tracking(builder, rng, budget):
    names = list(dict.fromkeys(_word(rng).upper()[:5] for _ in range(8)))[:3]
    value = _digits(rng, 5)
    chain = [f" VAR {names[0]} = {value}."] + [f" VAR {b} = VAR {a}."
                                              for a, b in itertools.pairwise(names)]
    depths = sorted(rng.random() for _ in chain)
    question = f"Find all variables that are assigned the value {value} in the text above."
    lead_in = (f"Answer: According to the chain(s) of variable assignment in the text above, "
               f"{len(names)} variables are assigned the value {value}, they are: VAR")
    head, tail = builder.chat([], question, lead_in)
    inserts = [(d, builder.ids(c)) for d, c in zip(depths, chain)]
    body = _fit(builder, budget - len(head) - len(tail), [], lambda: NOISE, inserts)
    return head + body + tail, " " + names[0]


def generate_task(tokenizer, task: str, context_tokens: int, num_samples: int,
                  seed: int = 0) -> list[TaskSample]:
    """``num_samples`` samples of ``task`` whose prompt has ``context_tokens -
    ANSWER_BUDGET_TOKENS`` tokens, deterministic in ``seed``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    builder = _Builder(tokenizer)
    budget = context_tokens - ANSWER_BUDGET_TOKENS
    samples = []
    for i in range(num_samples):
        rng = random.Random(f"{task}/{context_tokens}/{seed}/{i}")
        if task == "niah_single":
            prompt, answer = _niah(builder, rng, budget, 1)
        elif task == "niah_multikey":
            prompt, answer = _niah(builder, rng, budget, 4)
        elif task == "kv_retrieval":
            prompt, answer = _kv_retrieval(builder, rng, budget)
        else:
            prompt, answer = _variable_tracking(builder, rng, budget)
        assert len(prompt) == budget, (task, len(prompt), budget)
        samples.append(TaskSample(task, prompt, builder.ids(answer), answer))
    return samples
