"""RULER's synthetic samples, offline (Hsieh et al. 2024, arXiv:2404.06654; NVIDIA/RULER): each task's prompts
fitted to a token budget with the model's tokenizer, cached as JSON, and scored as RULER scores them.

    samples = ruler_samples("niah_single_1", 4096, count_tokens, texts, n=8, seed=0)
    score(samples[0], reply)   # the share of the answers the reply holds

A sample's input is wrap(user text) + answer prefix: the chat template (wrap) holds the question, the model's reply
continues the prefix (RULER's prepare.py). Its haystack is the largest that leaves max_new_tokens of the length
free: count_tokens(input) + max_new_tokens ≤ length, and one unit more would not fit. A length too short for the
smallest prompt raises RulerDoesNotFit; nothing is ever cut.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Optional, Union

from minillm.data.ruler_haystacks import essay_words, largest_fitting
from minillm.data.ruler_tasks import RULER_TASKS, Prompt, PromptInputs, RulerDoesNotFit, RulerTask
from minillm.files import write_atomic
from minillm.registry import require

__all__ = ["RULER_TASKS", "RulerDoesNotFit", "RulerSample", "RulerTask", "cached_ruler_samples", "ruler_samples",
           "score", "string_match_all", "string_match_part"]

CACHE_FORMAT = 1  # bumped whenever the same key would give other samples: old cache files are then not read


@dataclass(frozen=True)
class RulerSample:
    """One prompt with its answers, as a scorer and a report need it."""

    task: str  # the RULER name (niah_single_1, vt, cwe, ...)
    index: int  # its number under its seed: sample i is the same whatever the count asked for
    length: int  # the token budget: prompt tokens + max_new_tokens fit in it
    input: str  # the whole prompt, ending with the answer prefix
    answers: tuple[str, ...]  # every string a right reply holds
    max_new_tokens: int  # the tokens to generate (RULER's tokens_to_generate)
    metric: str  # all (string_match_all) or part (string_match_part)
    prompt_tokens: int  # count_tokens(input)
    haystack_units: int  # the haystack's size in the task's units (lines, words, needles, listed or coded words)
    # where the first needle holding an answer starts, a share of the context's characters (None: cwe, fwe)
    depth: Optional[float] = None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "answers": list(self.answers)}

    @classmethod
    def from_dict(cls, d: dict) -> "RulerSample":
        """The sample a to_dict wrote; ValueError on anything else (a cache file is checked, not trusted)."""
        names = [f.name for f in dataclasses.fields(cls)]
        require(isinstance(d, dict) and set(d) == set(names), "ruler sample", f"expected the fields {names}")
        types = {"task": str, "input": str, "metric": str, "index": int, "length": int, "max_new_tokens": int,
                 "prompt_tokens": int, "haystack_units": int}
        for name, kind in types.items():
            require(isinstance(d[name], kind) and not isinstance(d[name], bool), f"ruler sample.{name}",
                    f"expected {kind.__name__}, got {d[name]!r}")
        require(isinstance(d["answers"], list) and d["answers"] and all(isinstance(a, str) for a in d["answers"]),
                "ruler sample.answers", "expected a non-empty list of strings")
        require(d["depth"] is None or isinstance(d["depth"], (int, float)), "ruler sample.depth",
                f"expected a number or null, got {d['depth']!r}")
        require(d["metric"] in METRICS, "ruler sample.metric", f"expected one of {sorted(METRICS)}")
        return cls(**{**d, "answers": tuple(d["answers"])})


def completion(user: str) -> str:
    """No chat template: the prompt is the user's text itself."""
    return user


def ruler_task(task: Union[str, RulerTask]) -> RulerTask:
    """The task's config: an instance as given, a name with RULER's settings."""
    return task if isinstance(task, RulerTask) else RULER_TASKS.lookup(task)()


def sample_prompt(config: RulerTask, units: int, seed: int, index: int, inputs: PromptInputs,
                  wrap: Callable[[str], str]) -> tuple[Prompt, str]:
    """Sample `index`'s prompt under `seed` with a haystack of `units`, and its whole text (what the search tries:
    its draws depend on the seed, the task and the index alone)."""
    made = config.prompt(units, random.Random(f"ruler/{config.name}/{seed}/{index}"), inputs)
    return made, wrap(made.user) + made.answer_prefix


def ruler_samples(task: Union[str, RulerTask], length: int, count_tokens: Callable[[str], int],
                  haystack_texts: Sequence[str], n: int, seed: int,
                  wrap: Optional[Callable[[str], str]] = None) -> list[RulerSample]:
    """n samples of `task` for a budget of `length` tokens, each drawn from (seed, task, its index).

    count_tokens: the model's tokenizer (str -> number of tokens, as the prompt will be fed). haystack_texts: the
    prose of the essay haystacks (unused by the others). wrap: the chat template, user text -> prompt text; None:
    completion prompts. Raises RulerDoesNotFit where even the smallest haystack leaves too few tokens.
    """
    config = ruler_task(task)
    require(isinstance(length, int) and length > 0, "ruler length", f"must be a positive integer, got {length!r}")
    require(n >= 0, "ruler samples", f"must be at least 0, got {n}")
    words = essay_words(haystack_texts) if config.reads_prose else []
    require(bool(words) or not config.reads_prose, "ruler", f"{config.name} reads prose (type_haystack=essay) "
            f"and the haystack texts hold none")
    inputs = PromptInputs(length, words, count_tokens)
    samples: list[RulerSample] = []
    for index in range(n):
        samples.append(fitted_sample(config, seed, index, inputs, wrap or completion,
                                     samples[-1].haystack_units if samples else None))
    return samples


def fitted_sample(config: RulerTask, seed: int, index: int, inputs: PromptInputs, wrap: Callable[[str], str],
                  hint: Optional[int]) -> RulerSample:
    """Sample `index` with the largest haystack that leaves the task's tokens to generate free (hint: a size to
    try first)."""
    probes: dict[int, tuple[Prompt, str, int]] = {}

    def tokens_at(units: int) -> int:
        made, text = sample_prompt(config, units, seed, index, inputs, wrap)
        probes[units] = (made, text, inputs.count_tokens(text))
        return probes[units][2]

    lowest = config.smallest(inputs.length)
    units = largest_fitting(tokens_at, inputs.length - config.tokens_to_generate, lowest, hint)
    if units is None:
        raise RulerDoesNotFit(f"ruler: {config.name} does not fit in {inputs.length} tokens: its smallest prompt "
                              f"takes {probes[lowest][2]} tokens and {config.tokens_to_generate} more are generated; "
                              f"take a longer length")
    made, text, tokens = probes[units]
    return RulerSample(config.name, index, inputs.length, text, made.answers, config.tokens_to_generate,
                       config.metric, tokens, units, made.depth)


def cache_key(config: RulerTask, length: int, tokenizer_hash: str, haystack_texts: Sequence[str], n: int,
              seed: int, wrap: Optional[Callable[[str], str]]) -> dict:
    """Everything the samples depend on: the task's settings, the length, the tokenizer, the prose (for essay
    haystacks only), the seed and count, the word lists' version, and the chat template (known by what it makes of a
    marker text)."""
    prose = hashlib.sha256()
    for text in haystack_texts if config.reads_prose else ():
        prose.update(f"{len(text)}:".encode() + text.encode("utf-8"))
    marker = "\x00ruler user text\x00"
    return {"format": CACHE_FORMAT, "task": config.name, "settings": dataclasses.asdict(config), "length": length,
            "tokenizer": tokenizer_hash, "prose": prose.hexdigest() if config.reads_prose else None, "n": n,
            "seed": seed, "wrap": None if wrap is None else hashlib.sha256(wrap(marker).encode()).hexdigest(),
            "words": metadata.version("wonderwords")}


def cached_ruler_samples(task: Union[str, RulerTask], length: int, count_tokens: Callable[[str], int],
                         haystack_texts: Sequence[str], n: int, seed: int,
                         wrap: Optional[Callable[[str], str]] = None, *, cache_dir: Path,
                         tokenizer_hash: str) -> list[RulerSample]:
    """ruler_samples, read from <cache_dir>/ruler/ when made before with the same key (tokenizer_hash names the
    tokenizer), else made and written there whole. A file that does not read back as the key's samples is made
    again and replaced."""
    config = ruler_task(task)
    key = cache_key(config, length, tokenizer_hash, haystack_texts, n, seed, wrap)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / "ruler" / f"{config.name}-{length}-{digest}.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored["key"] == key and len(stored["samples"]) == n:
            return [RulerSample.from_dict(d) for d in stored["samples"]]
    except (OSError, ValueError, KeyError, TypeError):  # missing, torn or foreign: made again below
        pass
    samples = ruler_samples(config, length, count_tokens, haystack_texts, n, seed, wrap)
    write_atomic(path, json.dumps({"key": key, "samples": [s.to_dict() for s in samples]}, indent=1))
    return samples


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """The share of the answers found in the prediction, case ignored (RULER's string_match_all for one
    sample, as a fraction rather than a percentage)."""
    found = prediction.lower()
    return sum(answer.lower() in found for answer in answers) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when any answer is found in the prediction, case ignored, else 0.0 (RULER's string_match_part)."""
    found = prediction.lower()
    return float(any(answer.lower() in found for answer in answers))


METRICS = {"all": string_match_all, "part": string_match_part}


def score(sample: RulerSample, prediction: str) -> float:
    """The sample's score in [0, 1] by its metric."""
    return METRICS[sample.metric](prediction, sample.answers)
