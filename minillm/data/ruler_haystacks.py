"""The pieces RULER's prompts are made of (Hsieh et al. 2024, arXiv:2404.06654; NVIDIA/RULER's
scripts/data/synthetic): wonderwords' word lists, random keys and values, the noise paragraph, prose cut into
sentences, items put in at depths, and Riemann's zeta for the frequent-word task. Offline: no nltk, no download."""

from __future__ import annotations

import functools
import math
import random
import re
import uuid
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Optional

import wonderwords.assets

# The repeated filler of the noise haystack (RULER's niah.py and variable_tracking.py).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# The depths (percent of the sentences) essay needles go in at: 40 evenly spaced, rounded (RULER's DEPTHS).
DEPTHS = tuple(round(100 * i / 39) for i in range(40))

# A word that ends a sentence: a full stop, ! or ?, then any closing quotes or brackets.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*$")


@functools.cache
def word_list(file: str) -> tuple[str, ...]:
    """One of wonderwords' bundled lists (nounlist.txt, adjectivelist.txt, verblist.txt), sorted and without
    repeats, each line stripped on the right as RULER reads it."""
    text = resources.files(wonderwords.assets).joinpath(file).read_text(encoding="utf-8")
    return tuple(sorted({line.rstrip() for line in text.splitlines()}))


@functools.cache
def common_words() -> tuple[str, ...]:
    """Nouns, adjectives and verbs together, sorted, each once: the pool common-word extraction draws from."""
    return tuple(sorted(set(word_list("nounlist.txt")) | set(word_list("adjectivelist.txt"))
                        | set(word_list("verblist.txt"))))


def random_key(kind: str, rng: random.Random) -> str:
    """A needle's key or value: words (an adjective-noun pair, 'quizzical-atm'), numbers (7 digits), uuids."""
    if kind == "words":
        return f"{rng.choice(word_list('adjectivelist.txt'))}-{rng.choice(word_list('nounlist.txt'))}"
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def distinct(draw: Callable[[], str], count: int, taken: set[str]) -> list[str]:
    """`count` draws, none equal to another or to one in `taken` (which they join): RULER does not check, and a
    repeated key would make two answers right."""
    drawn: list[str] = []
    while len(drawn) < count:
        item = draw()
        if item not in taken:
            taken.add(item)
            drawn.append(item)
    return drawn


def essay_words(texts: Sequence[str]) -> list[str]:
    """The prose texts as one run of words, every stretch of white space one space (RULER's essay haystack)."""
    return " ".join(texts).split()


def first_words(words: Sequence[str], count: int) -> list[str]:
    """The first `count` words, starting over from the first word as often as needed."""
    if count <= len(words):
        return list(words[:count])
    return list(words) * (count // len(words)) + list(words[:count % len(words)])


def sentences(words: Sequence[str]) -> list[str]:
    """Words grouped into sentences, each closed by a word that ends in . ! or ? (a plain rule in place of nltk's
    punkt, which needs a download; an abbreviation also ends one). Joined by spaces they give the text back."""
    grouped, start = [], 0
    for i, word in enumerate(words):
        if _SENTENCE_END.search(word):
            grouped.append(" ".join(words[start:i + 1]))
            start = i + 1
    if start < len(words):
        grouped.append(" ".join(words[start:]))
    return grouped


def insert_at_depths(sentence_list: Sequence[str], items: Sequence[str], depths: Sequence[int]) -> str:
    """The sentences with item k between the sentences before and after depths[k] percent of them (depths
    sorted), all joined by spaces; an empty stretch still adds its space, as in RULER's niah.py."""
    cuts = [0] + sorted(int(len(sentence_list) * depth / 100) for depth in depths) + [len(sentence_list)]
    pieces = []
    for k in range(len(cuts) - 1):
        pieces.append(" ".join(sentence_list[cuts[k]:cuts[k + 1]]))
        if k < len(items):
            pieces.append(items[k])
    return " ".join(pieces)


def insert_at_lines(lines: list[str], items: Sequence[str], rng: random.Random) -> list[str]:
    """The lines with each item before a distinct line drawn uniformly (in the items' order: RULER's noise and
    needle haystacks)."""
    places = sorted(rng.sample(range(len(lines)), len(items)), reverse=True)
    lines = list(lines)
    for place, item in zip(places, items):
        lines.insert(place, item)
    return lines


def zeta(s: float, terms: int = 64) -> float:
    """Riemann's ζ(s) = Σ k^-s for s > 1, by Euler-Maclaurin: the first terms−1 summed, the tail as
    N^(1-s)/(s-1) + N^-s/2 + s·N^(-s-1)/12 − s(s+1)(s+2)·N^(-s-3)/720 (N = terms; error far below 1e-12)."""
    n = float(terms)
    head = math.fsum(k ** -s for k in range(1, terms))
    return head + n ** (1 - s) / (s - 1) + n ** -s / 2 + s * n ** (-s - 1) / 12 \
        - s * (s + 1) * (s + 2) * n ** (-s - 3) / 720


def largest_fitting(tokens_at: Callable[[int], int], budget: int, lowest: int, hint: Optional[int] = None
                    ) -> Optional[int]:
    """The haystack size u ≥ lowest with tokens_at(u) ≤ budget < tokens_at(u + 1); None when lowest does not fit.

    RULER bisects between bounds; token counts grow almost linearly with the size, so this interpolates between a
    size that fits and one that does not (a bisection step where one end has stayed put twice), which takes a
    handful of calls. The bracket holds throughout, so the answer is maximal by one unit even where the count is
    not monotone. hint: a size to try first (the previous sample's).
    """
    lo, t_lo = lowest, tokens_at(lowest)
    if t_lo > budget:
        return None
    hi = t_hi = None
    guess, step = (hint if hint is not None and hint > lowest else lowest + 64), 1
    while hi is None:  # grow until a size does not fit
        t = tokens_at(guess)
        if t > budget:
            hi, t_hi = guess, t
            break
        slope = max((t - t_lo) / (guess - lo), 1e-9)
        lo, t_lo, step = guess, t, step * 2
        guess = lo + min(max(math.ceil((budget + 1 - t_lo) / slope), step), 2 * lo + 64)  # at most x3 a step
    moved, repeats = None, 0  # which end moved last, and how many times in a row
    while hi - lo > 1:
        if repeats >= 2:
            guess, repeats = (lo + hi) // 2, 0
        else:
            guess = min(max(lo + int((budget - t_lo) * (hi - lo) / (t_hi - t_lo)), lo + 1), hi - 1)
        t = tokens_at(guess)
        side = "lo" if t <= budget else "hi"
        repeats, moved = (repeats + 1 if side == moved else 1), side
        if side == "lo":
            lo, t_lo = guess, t
        else:
            hi, t_hi = guess, t
    return lo
