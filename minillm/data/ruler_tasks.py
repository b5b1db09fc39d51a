"""RULER's synthetic task configs (Hsieh et al. 2024, arXiv:2404.06654; NVIDIA/RULER scripts/synthetic.yaml), one
registered class per named task, each building its prompt for a haystack of a given size.

A task's `prompt(units, rng, inputs)` draws everything from `rng` (a fresh random.Random per call, so one seed and
one size give one prompt) and returns the user's text, the answer prefix and the answers. `units` counts the
haystack in RULER's own steps: noise lines, words of prose, decoy needles, listed words, coded words. The QA tasks
(qa_1, qa_2) are left out: they read SQuAD and HotpotQA, which are not offline.
"""

from __future__ import annotations

import abc
import heapq
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Optional

from minillm.data import ruler_haystacks as hay
from minillm.registry import Registry, choice, finite, require

# Each RulerTask subclass under its RULER name (niah_single_1, vt, cwe, ...): the evaluation's `ruler` entries.
RULER_TASKS = Registry("ruler", unknown="unknown RULER task {name!r}; one of {choices}", member="the RULER task {name}")


class RulerDoesNotFit(ValueError):
    """A length too short for a task's smallest prompt; the message names the task and the length."""


@dataclass(frozen=True)
class PromptInputs:
    """What a prompt depends on besides its size and seed: the length it is for, the prose, the tokenizer."""

    length: int  # the token budget the sample is made for (cwe and fwe shape their lists by it)
    words: Sequence[str]  # the prose haystack as words (empty where the task reads none)
    count_tokens: Callable[[str], int]  # the model's tokenizer (vt fits its worked example with it)


@dataclass(frozen=True)
class Prompt:
    """A sample before it is wrapped: the user's text, the answer prefix, the answers, where the first sits."""

    user: str  # the task's text, to go through the chat template (or none)
    answer_prefix: str  # appended after the template: the model's answer continues it
    answers: tuple[str, ...]  # every string the reply should hold
    # where the first needle holding an answer (vt: the asked chain's first line) starts, a share of the context
    depth: Optional[float]


@dataclass(frozen=True)
class RulerTask(abc.ABC):
    """A RULER task's knobs; subclasses build the prompt. tokens_to_generate: RULER's per task (constants.py)."""

    name: ClassVar[str]
    tokens_to_generate: ClassVar[int]
    metric: ClassVar[str] = "all"  # string_match_all for every task here (part is QA's)

    @property
    def reads_prose(self) -> bool:
        """Whether the prompt is made of the prose texts handed in (the essay haystack)."""
        return getattr(self, "type_haystack", None) == "essay"

    @abc.abstractmethod
    def smallest(self, length: int) -> int:
        """The fewest haystack units a prompt can have at this length."""

    @abc.abstractmethod
    def prompt(self, units: int, rng: random.Random, inputs: PromptInputs) -> Prompt:
        """The prompt with a haystack of `units`, every draw from `rng`."""


def _depth(context: str, needle: str) -> float:
    """Where `needle` starts in the context, as a share of its characters."""
    return context.index(needle) / max(len(context), 1)


@dataclass(frozen=True)
class NeedleTask(RulerTask):
    """Needle in a haystack (RULER's niah.py): needles "One of the special magic {values} for {key} is: {value}."
    hidden in a haystack; the question names num_needle_q of the keys, the answers are all their values."""

    tokens_to_generate: ClassVar[int] = 128
    # the haystack: noise (one paragraph repeated, a line each), essay (the prose handed in), needle (decoy needles)
    type_haystack: str = "essay"
    type_needle_k: str = "words"  # the keys: words (adjective-noun pairs), numbers (7 digits) or uuids
    type_needle_v: str = "numbers"  # the values: words, numbers or uuids
    num_needle_k: int = 1  # keys hidden (raised to num_needle_q where that is larger, as RULER does)
    num_needle_v: int = 1  # values per key, each in its own needle
    num_needle_q: int = 1  # keys the question asks for

    def __post_init__(self):
        choice(self.type_haystack, "type_haystack", ("noise", "essay", "needle"))
        choice(self.type_needle_k, "type_needle_k", ("words", "numbers", "uuids"))
        choice(self.type_needle_v, "type_needle_v", ("words", "numbers", "uuids"))
        for knob in ("num_needle_k", "num_needle_v", "num_needle_q"):
            require(getattr(self, knob) >= 1, knob, f"must be at least 1, got {getattr(self, knob)}")
        if self.type_haystack == "essay":
            require(self.num_keys * self.num_needle_v <= len(hay.DEPTHS), "num_needle_v",
                    f"an essay holds at most {len(hay.DEPTHS)} needles (one per depth), got "
                    f"{self.num_keys} keys x {self.num_needle_v} values")

    @property
    def num_keys(self) -> int:
        return max(self.num_needle_k, self.num_needle_q)

    def smallest(self, length: int) -> int:
        return 1 if self.type_haystack == "essay" else self.num_keys * self.num_needle_v

    def prompt(self, units: int, rng: random.Random, inputs: PromptInputs) -> Prompt:
        taken: set[str] = set()
        keys = hay.distinct(lambda: hay.random_key(self.type_needle_k, rng), self.num_keys, taken)
        values = [hay.distinct(lambda: hay.random_key(self.type_needle_v, rng), self.num_needle_v, taken)
                  for _ in keys]
        needles = [self._needle(key, value) for key, key_values in zip(keys, values) for value in key_values]
        rng.shuffle(needles)
        asked = rng.sample(range(self.num_keys), self.num_needle_q)
        answers = tuple(value for k in asked for value in values[k])
        if self.type_haystack == "essay":
            depths = rng.sample(hay.DEPTHS, len(needles))
            context = hay.insert_at_depths(hay.sentences(hay.first_words(inputs.words, units)), needles, depths)
        else:
            if self.type_haystack == "noise":
                lines = [hay.NOISE] * units
            else:  # decoys: needles of fresh keys and values, none equal to a real one
                decoy_keys = hay.distinct(lambda: hay.random_key(self.type_needle_k, rng), units, taken)
                lines = [self._needle(key, hay.random_key(self.type_needle_v, rng)) for key in decoy_keys]
            context = "\n".join(hay.insert_at_lines(lines, needles, rng))
        queries = [keys[k] for k in asked]
        query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
        user, prefix = self._text(context, query, plural=len(answers) > 1)
        depth = min(_depth(context, self._needle(keys[k], value)) for k in asked for value in values[k])
        return Prompt(user, prefix, answers, depth)

    def _needle(self, key: str, value: str) -> str:
        return f"One of the special magic {self.type_needle_v} for {key} is: {value}."

    def _text(self, context: str, query: str, plural: bool) -> tuple[str, str]:
        """The question in the plural where several values are asked for, else in the singular (RULER's
        replacements: Some -> A, are all -> is, are -> is, numbers -> number)."""
        noun = self.type_needle_v if plural else self.type_needle_v[:-1]
        some, are, are_all = ("Some", "are", "are all") if plural else ("A", "is", "is")
        user = (f"{some} special magic {noun} {are} hidden within the following text. Make sure to memorize it. "
                f"I will quiz you about the {noun} afterwards.\n{context}\n"
                f"What {are_all} the special magic {noun} for {query} mentioned in the provided text?")
        return user, f" The special magic {noun} for {query} mentioned in the provided text {are}"


@RULER_TASKS.register("niah_single_1")
@dataclass(frozen=True)
class NiahSingle1(NeedleTask):
    """One needle, number values, in the noise haystack."""

    type_haystack: str = "noise"  # noise, essay or needle


@RULER_TASKS.register("niah_single_2")
@dataclass(frozen=True)
class NiahSingle2(NeedleTask):
    """One needle, number values, in the prose."""


@RULER_TASKS.register("niah_single_3")
@dataclass(frozen=True)
class NiahSingle3(NeedleTask):
    """One needle, uuid values, in the prose."""

    type_needle_v: str = "uuids"  # words, numbers or uuids


@RULER_TASKS.register("niah_multikey_1")
@dataclass(frozen=True)
class NiahMultikey1(NeedleTask):
    """Four keys hidden in the prose, one asked for."""

    num_needle_k: int = 4  # keys hidden


@RULER_TASKS.register("niah_multikey_2")
@dataclass(frozen=True)
class NiahMultikey2(NeedleTask):
    """One needle among decoy needles of word keys and number values."""

    type_haystack: str = "needle"  # noise, essay or needle


@RULER_TASKS.register("niah_multikey_3")
@dataclass(frozen=True)
class NiahMultikey3(NeedleTask):
    """One needle among decoy needles, uuid keys and values."""

    type_haystack: str = "needle"  # noise, essay or needle
    type_needle_k: str = "uuids"  # words, numbers or uuids
    type_needle_v: str = "uuids"  # words, numbers or uuids


@RULER_TASKS.register("niah_multivalue")
@dataclass(frozen=True)
class NiahMultivalue(NeedleTask):
    """One key with four values, each in its own needle, in the prose; all four are the answer."""

    num_needle_v: int = 4  # values per key


@RULER_TASKS.register("niah_multiquery")
@dataclass(frozen=True)
class NiahMultiquery(NeedleTask):
    """Four keys in the prose, all four asked for."""

    num_needle_q: int = 4  # keys asked for (and so hidden)


@RULER_TASKS.register("vt")
@dataclass(frozen=True)
class VariableTracking(RulerTask):
    """Variable tracking (RULER's variable_tracking.py): chains "VAR B = VAR A" from "VAR A = 12345" hidden in a
    haystack; the answer is every variable of the first chain. A worked example (3-letter names, up to 10 hops,
    fitted to 500 tokens) comes first, inside the user's text."""

    tokens_to_generate: ClassVar[int] = 30
    example_tokens: ClassVar[int] = 500  # the worked example's budget (RULER's)
    type_haystack: str = "noise"  # noise (the paragraph, a line each) or essay (the prose handed in)
    num_chains: int = 1  # chains hidden; the first is asked for, the others are decoys
    num_hops: int = 4  # assignments after the first in each chain

    def __post_init__(self):
        choice(self.type_haystack, "type_haystack", ("noise", "essay"))
        require(self.num_chains >= 1, "num_chains", f"must be at least 1, got {self.num_chains}")
        require(self.num_hops >= 1, "num_hops", f"must be at least 1, got {self.num_hops}")
        if self.type_haystack == "essay":
            require(self.num_chains * (self.num_hops + 1) <= len(hay.DEPTHS), "num_hops",
                    f"an essay holds at most {len(hay.DEPTHS)} assignments, got {self.num_chains} chains of "
                    f"{self.num_hops + 1}")

    def smallest(self, length: int) -> int:
        return 1 if self.type_haystack == "essay" else self.num_hops + 1

    def prompt(self, units: int, rng: random.Random, inputs: PromptInputs) -> Prompt:
        example_seed = rng.getrandbits(64)
        names, chains = self._chains(rng, self.num_chains, self.num_hops, letters=5)
        value = chains[0][0].split("= ")[-1]
        context = self._context(units, chains, rng, inputs.words)
        user, prefix = self._text(context, value, self.num_hops + 1)
        return Prompt(self._example(example_seed, inputs) + "\n" + user, prefix, tuple(names[0]),
                      _depth(context, chains[0][0]))

    def _example(self, seed: int, inputs: PromptInputs) -> str:
        """The worked example: its question, prefix and answer, its haystack the largest that fits 500 tokens."""
        hops = min(10, self.num_hops)

        def text(units: int) -> str:
            rng = random.Random(seed)
            names, chains = self._chains(rng, self.num_chains, hops, letters=3)
            context = self._context(units, chains, rng, inputs.words)
            user, prefix = self._text(context, chains[0][0].split("= ")[-1], hops + 1)
            return user + prefix + " " + " ".join(names[0]) + "\n"

        lowest = self.smallest(inputs.length)
        units = hay.largest_fitting(lambda n: inputs.count_tokens(text(n)), self.example_tokens, lowest)
        return text(units if units is not None else lowest)

    @staticmethod
    def _chains(rng: random.Random, count: int, hops: int, letters: int) -> tuple[list[list[str]], list[list[str]]]:
        """count chains of hops + 1 distinct upper-case names: "VAR A = 12345", then "VAR B = VAR A " ..."""
        pool = hay.distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=letters)), count * (hops + 1),
                            set())
        names = [pool[i * (hops + 1):(i + 1) * (hops + 1)] for i in range(count)]
        chains = [[f"VAR {chain[0]} = {rng.randint(10000, 99998)}"]
                  + [f"VAR {chain[j + 1]} = VAR {chain[j]} " for j in range(hops)] for chain in names]
        return names, chains

    def _context(self, units: int, chains: list[list[str]], rng: random.Random, words: Sequence[str]) -> str:
        """The haystack with the chains in it. Noise: each chain's lines in order at random lines, chain by chain;
        essay: all chains' lines merged at random (each chain's order kept), one per depth, each closed by '.'."""
        if self.type_haystack == "essay":
            flat = self._interleaved(chains, rng)
            depths = rng.sample(hay.DEPTHS, len(flat))
            return hay.insert_at_depths(hay.sentences(hay.first_words(words, units)),
                                        [line.strip() + "." for line in flat], depths)
        lines = [hay.NOISE] * units
        for chain in chains:
            places = sorted(rng.sample(range(len(lines)), len(chain)))
            for j, (place, line) in enumerate(zip(places, chain)):
                lines.insert(place + j, line)
        return "\n".join(lines)

    @staticmethod
    def _interleaved(chains: list[list[str]], rng: random.Random) -> list[str]:
        """The chains' lines merged at random, each chain's order kept (RULER's shuffle_sublists_heap)."""
        heap = [(rng.random(), i, 0) for i in range(len(chains))]
        heapq.heapify(heap)
        merged = []
        while heap:
            _, i, j = heapq.heappop(heap)
            merged.append(chains[i][j])
            if j + 1 < len(chains[i]):
                heapq.heappush(heap, (rng.random(), i, j + 1))
        return merged

    @staticmethod
    def _text(context: str, value: str, count: int) -> tuple[str, str]:
        user = (f"Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
                f"Question: Find all variables that are assigned the value {value} in the text above.")
        return user, (f" Answer: According to the chain(s) of variable assignment in the text above, {count} "
                      f"variables are assigned the value {value}, they are: ")


@RULER_TASKS.register("cwe")
@dataclass(frozen=True)
class CommonWords(RulerTask):
    """Common-word extraction (RULER's common_words_extraction.py): a numbered list in which num_cw words appear
    freq_cw times and every other word freq_ucw times; the answer is the num_cw common words. Worked examples of
    40 words (10 and 3 times) come first, inside the user's text. Below 4096 tokens RULER's shorter setting holds:
    examples of 20 words (3 and 1 times), the common words 6 times and the others once."""

    tokens_to_generate: ClassVar[int] = 120
    short_length: ClassVar[int] = 4096  # lengths below it take the shorter setting (RULER's)
    freq_cw: int = 30  # times each common word appears
    freq_ucw: int = 3  # times each other word appears
    num_cw: int = 10  # common words (the answers)
    num_fewshot: int = 1  # worked examples before the question

    def __post_init__(self):
        for knob in ("freq_ucw", "num_cw"):
            require(getattr(self, knob) >= 1, knob, f"must be at least 1, got {getattr(self, knob)}")
        require(self.freq_cw > self.freq_ucw, "freq_cw", f"must exceed freq_ucw ({self.freq_ucw}), got {self.freq_cw}")
        require(self.num_fewshot >= 0, "num_fewshot", f"must be at least 0, got {self.num_fewshot}")

    def smallest(self, length: int) -> int:
        return self.num_cw + 1

    def prompt(self, units: int, rng: random.Random, inputs: PromptInputs) -> Prompt:
        short = inputs.length < self.short_length
        examples = []
        for _ in range(self.num_fewshot):
            context, common = self._list(20 if short else 40, (3, 1) if short else (10, 3), rng)
            user, prefix = self._text(context)
            examples.append(user + prefix + " " + self._numbered(common))
        context, common = self._list(units, (6, 1) if short else (self.freq_cw, self.freq_ucw), rng)
        user, prefix = self._text(context)
        return Prompt("\n".join(examples) + "\n" + user, prefix, tuple(common), None)

    def _list(self, count: int, repeats: tuple[int, int], rng: random.Random) -> tuple[str, list[str]]:
        """count distinct words, the first num_cw repeated repeats[0] times and the rest repeats[1], shuffled
        and numbered. Past the pool of single words, adjective-noun pairs join it (RULER reads a longer English
        word list there, which is not offline)."""
        pool = hay.common_words()
        if count <= len(pool):
            words = rng.sample(pool, count)
        else:
            words = list(pool) + hay.distinct(lambda: hay.random_key("words", rng), count - len(pool), set(pool))
            rng.shuffle(words)
        common, rest = words[:self.num_cw], words[self.num_cw:]
        listed = common * repeats[0] + rest * repeats[1]
        rng.shuffle(listed)
        return self._numbered(listed), common

    @staticmethod
    def _numbered(words: Sequence[str]) -> str:
        return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))

    def _text(self, context: str) -> tuple[str, str]:
        user = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                f"the ones that appear most often.\n{context}\nQuestion: What are the {self.num_cw} most common words "
                "in the above list?")
        return user, f" Answer: The top {self.num_cw} words that appear most often in the list are:"


@RULER_TASKS.register("fwe")
@dataclass(frozen=True)
class FrequentWords(RulerTask):
    """Frequent-word extraction (RULER's freq_words_extraction.py): coded words of coded_wordlen random letters,
    the word of rank k appearing ⌊N·k^-alpha/ζ(alpha)⌋ times (a Zipf law), the top one replaced by '...' as noise;
    the answer is the words of ranks 2 to 4. The haystack size is N."""

    tokens_to_generate: ClassVar[int] = 50
    alpha: float = 2.0  # the Zipf exponent (above 1)
    coded_wordlen: int = 6  # letters per coded word
    # coded words to draw from; None: (length − tokens_to_generate) // 50, as RULER sizes it
    vocab_size: Optional[int] = None

    def __post_init__(self):
        require(self.alpha > 1, "alpha", f"must exceed 1 (ζ(alpha) diverges at 1), got {self.alpha}")
        require(self.coded_wordlen >= 3, "coded_wordlen", f"must be at least 3, got {self.coded_wordlen}")
        if self.vocab_size is not None:
            require(self.vocab_size >= 4, "vocab_size", f"must be at least 4 (noise and three answers), got "
                    f"{self.vocab_size}")
        finite(self, "")

    def vocabulary(self, length: int) -> int:
        return self.vocab_size if self.vocab_size is not None else (length - self.tokens_to_generate) // 50

    def smallest(self, length: int) -> int:
        """The smallest N at which rank 4 appears more often than rank 5 for every N from it on: the answer is
        then one set of three (⌊Nc₄⌋ − ⌊Nc₅⌋ > 0 once N·(c₄ − c₅) ≥ 1)."""
        if self.vocabulary(length) < 4:
            raise RulerDoesNotFit(f"ruler: fwe does not fit in {length} tokens: its coded vocabulary, "
                                  f"(length − {self.tokens_to_generate}) // 50 words, needs 4 (noise and three "
                                  f"answers); set vocab_size or take a longer length")
        fifth = 5 ** -self.alpha if self.vocabulary(length) >= 5 else 0.0
        return int(hay.zeta(self.alpha) / (4 ** -self.alpha - fifth)) + 1

    def prompt(self, units: int, rng: random.Random, inputs: PromptInputs) -> Prompt:
        def coded_word() -> str:
            return "".join(rng.choices(string.ascii_lowercase, k=self.coded_wordlen))

        vocabulary = sorted(hay.distinct(coded_word, self.vocabulary(inputs.length), set()))
        rng.shuffle(vocabulary)
        vocabulary[0] = "..."
        norm = hay.zeta(self.alpha)
        coded = [word for k, word in enumerate(vocabulary, 1) for _ in range(int(units * k ** -self.alpha / norm))]
        rng.shuffle(coded)
        user = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                f"frequently appeared coded words. {' '.join(coded)}\nQuestion: Do not provide any explanation. "
                "Please ignore the dots '....'. What are the three most frequently appeared words in the above coded "
                "text?")
        prefix = " Answer: According to the coded text above, the three most frequently appeared words are:"
        return Prompt(user, prefix, tuple(vocabulary[1:4]), None)
