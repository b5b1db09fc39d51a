"""Synthetic length-generalization tasks (needle, MQAR, copy, flip-flop), generated on the fly from a seed.

Each task is one config class registered with `@register_task`: its knobs with their defaults, its token layout
(a small fixed vocabulary, written in its docstring), how its sizes follow the sequence length, and `sample`.
One example fills one window of exactly `length` tokens (as Zoology does): a longer evaluation length means a
larger instance of the task (more pairs, a longer haystack, a longer sequence to copy), as each class states.

An example is `length` inputs and `length` targets: the next token at each answer, IGNORE (-100, the default
ignore_index of F.cross_entropy) everywhere else, so the ordinary language-model loss is the answer-only loss.
Targets are the next input token (teacher forcing), except in MQAR with show_values off (Zoology's layout, where
a queried value stays hidden). Answers are numbered in reading order: `answers[t] = k` when target t belongs to
the k-th answer, -1 elsewhere; exact match asks every token of an answer to be right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from minillm.registry import Registry, finite, positive, require

IGNORE = -100  # target of every non-answer position: F.cross_entropy's default ignore_index


@dataclass
class Example:
    """One window, each (length,) int64: inputs, targets (IGNORE except at answers) and the answer each target
    belongs to (-1: none)."""

    inputs: Tensor
    targets: Tensor
    answers: Tensor


def _answers(length: int, starts: Tensor, answer_length: int) -> Tensor:
    """Answer k covers targets starts[k] .. starts[k] + answer_length − 1, numbered in reading order."""
    answers = torch.full((length,), -1, dtype=torch.int64)
    index = (torch.sort(starts).values[:, None] + torch.arange(answer_length)).flatten()
    answers[index] = torch.arange(len(starts)).repeat_interleave(answer_length)
    return answers


def _example(pieces: list[Tensor], starts: Tensor, answer_length: int) -> Example:
    """A teacher-forced example from its length + 1 tokens: the answers' targets are their next tokens."""
    tokens = torch.cat(pieces)
    answers = _answers(len(tokens) - 1, starts, answer_length)
    return Example(tokens[:-1], torch.where(answers >= 0, tokens[1:], IGNORE), answers)


def _fill(count: int, token: int) -> Tensor:
    return torch.full((count,), token, dtype=torch.int64)


# Each TaskConfig subclass under its name: the value of data.task and its YAML knobs' key, data.tasks.<name>.
SYNTHETIC_TASKS = Registry("data.task", unknown="unknown task {name!r}; one of {choices}", member="the {name} task")
register_task = SYNTHETIC_TASKS.register


@dataclass
class TaskConfig:
    """What every task provides; knobs are checked when the config is built, lengths by `check_length`."""

    name: ClassVar[str] = ""

    def knob(self, field: str) -> str:
        """The setting's name on the command line."""
        return f"data.tasks.{self.name}.{field}"

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def min_length(self) -> int:
        """The shortest sequence length at which the prompt and one answer fit."""
        raise NotImplementedError

    def sizes(self, length: int) -> dict[str, int]:
        """The instance's sizes at `length` (pairs, copy length, ...): the task's length-scaling rule."""
        raise NotImplementedError

    def token_names(self) -> list[str]:
        """A name for each token id, as the layout in the class's docstring assigns them."""
        raise NotImplementedError

    def answer_length(self, length: int) -> int:
        """Tokens per answer at `length`."""
        return 1

    def check_length(self, length: int) -> None:
        require(length >= self.min_length, "model.context_length",
                 f"the {self.name} task needs sequences of at least {self.min_length} tokens with these knobs, "
                 f"got {length}")

    def sample(self, length: int, generator: torch.Generator) -> Example:
        raise NotImplementedError


@register_task("mqar")
@dataclass
class MQAR(TaskConfig):
    """Multi-query associative recall (Arora et al. 2023, arXiv:2312.04927; HazyResearch/zoology
    `zoology/data/multiquery_ar.py`): key–value pairs, then every key queried once, at power-law gaps.

    Layout: 0 filler, 1 .. num_keys keys, then num_values values. The inputs are `k1 v1 k2 v2 ... kp vp` followed
    by the query region of (length − 2p) // 2 two-token slots, filler except the p slots holding a query `k v`
    (its answer: v, the target at k), and one filler more when the region's size is odd. Keys are distinct,
    values drawn with replacement. Slot s (0-based, counted from the end of the pairs) is chosen with weight
    a·(s+1)^(a−1), a = power_a, p slots without replacement (Zoology's rule); unlike Zoology, which key goes to
    which slot is shuffled, so the query order says nothing about the pairs' order.
    show_values = False writes `k 0` instead, as Zoology does: shown, the values answered so far tell the last
    queries by elimination, so a model with no recall gets H_p/p of them right (52% at p = 4, 21% at p = 16)
    rather than 1/p. Shown is the default because it is what a 2-layer model learns in minutes: hidden, a
    d_model=64 model stayed at 1/p for 4000 steps where shown it reached 99.9% in 3900 (150 s). The elimination
    plateau is real: a d_model=128 model at lr 1e-3 sat at 51% (H_4/4) for 1500 steps.
    Length scaling: p = length // tokens_per_pair pairs, so 4x the length holds 4x the pairs; p must not exceed
    num_keys (the defaults reach 16 x 64 = 1024 tokens), and a longer length is refused, not capped.
    Defaults: tokens_per_pair 16 puts 4 pairs in 64 tokens (Zoology's range is 4..64): with its 8, a 2-layer
    d_model=64 model stayed on the "some value of the context" plateau (~35% right) for 4000 steps; with 4 it
    leaves it near step 2000.
    """

    num_keys: int = 64  # distinct keys; a window holds at most this many pairs
    num_values: int = 64  # values, drawn with replacement
    tokens_per_pair: int = 16  # tokens per pair: a window of T holds T // tokens_per_pair pairs
    power_a: float = 0.01  # a of the power law a·(s+1)^(a−1) that places the queries in slots s (Zoology's)
    show_values: bool = True  # write each queried value after its key (False: `k 0`, as Zoology)

    def __post_init__(self) -> None:
        require(self.num_keys >= 1, self.knob("num_keys"), f"must be at least 1, got {self.num_keys}")
        require(self.num_values >= 1, self.knob("num_values"), f"must be at least 1, got {self.num_values}")
        # Each pair takes 2 tokens and its query a 2-token slot: below 4 tokens per pair the queries do not fit.
        require(self.tokens_per_pair >= 4, self.knob("tokens_per_pair"),
                 f"must be at least 4 (2 tokens for a pair, 2 for its query), got {self.tokens_per_pair}")
        positive(self.power_a, self.knob("power_a"))
        finite(self, f"data.tasks.{self.name}", MQAR)

    @property
    def vocab_size(self) -> int:
        return 1 + self.num_keys + self.num_values

    def token_names(self) -> list[str]:
        return ["_", *(f"k{i}" for i in range(self.num_keys)), *(f"v{i}" for i in range(self.num_values))]

    @property
    def min_length(self) -> int:
        return self.tokens_per_pair

    def sizes(self, length: int) -> dict[str, int]:
        pairs = length // self.tokens_per_pair
        return {"num_pairs": pairs, "query_slots": (length - 2 * pairs) // 2}

    def check_length(self, length: int) -> None:
        super().check_length(length)
        pairs = self.sizes(length)["num_pairs"]
        require(pairs <= self.num_keys, self.knob("num_keys"),
                 f"mqar at length {length} holds {pairs} pairs (one per {self.knob('tokens_per_pair')}="
                 f"{self.tokens_per_pair} tokens) with distinct keys, but num_keys={self.num_keys}; "
                 f"raise num_keys or tokens_per_pair, or use a shorter length")

    def sample(self, length: int, generator: torch.Generator) -> Example:
        self.check_length(length)
        pairs, slots = self.sizes(length).values()
        keys = 1 + torch.randperm(self.num_keys, generator=generator)[:pairs]
        values = 1 + self.num_keys + torch.randint(self.num_values, (pairs,), generator=generator)
        weights = self.power_a * torch.arange(1, slots + 1, dtype=torch.float64) ** (self.power_a - 1)
        chosen = torch.multinomial(weights, pairs, replacement=False, generator=generator)
        queried = torch.randperm(pairs, generator=generator)  # which pair each chosen slot asks for
        context = torch.stack([keys, values], dim=1).flatten()
        inputs = torch.cat([context, _fill(length - 2 * pairs, 0)])
        at = 2 * pairs + 2 * chosen
        inputs[at] = keys[queried]
        if self.show_values:
            inputs[at + 1] = values[queried]
        targets = _fill(length, IGNORE)
        targets[at] = values[queried]
        return Example(inputs, targets, _answers(length, at, 1))


@register_task("needle")
@dataclass
class Needle(TaskConfig):
    """Key–value needles in a haystack of distractor pairs (RULER niah, Hsieh et al. 2024, arXiv:2404.06654;
    NVIDIA/RULER `scripts/data/synthetic/niah.py`: niah_single with num_queries 1, niah_multiquery above).

    Layout: 0 filler, 1 query marker, 2 .. num_keys + 1 keys, then num_values values. The window (the inputs
    and the last target) is `filler* slot*h filler*g (Q k v1..vn)*q`: h slots of tokens_per_pair tokens, each
    holding one pair (a key and n = value_length values) at a uniform offset, filler around it; q = num_queries
    of them are needles, with distinct keys that appear once in the haystack; distractor keys are any other key,
    repeats allowed, so the vocabulary bounds no length. Then g = query_gap fillers, which stand for RULER's
    question text, and each needle queried once, in a shuffled order: the query marker, its key and its value
    (an answer of n tokens). Fillers pad the start to the exact length. A single needle is in slot
    round(depth·(h − 1)), or in uniform slots when depth is None. tokens_per_pair = 1 + n packs the haystack
    with pairs (no filler).
    Length scaling: h = (length + 1 − g − q·(2 + n)) // tokens_per_pair slots, so the haystack and its
    distractors grow with the length at a fixed density; the needles and queries stay q.
    Defaults: with 64 values a needle's first value token recurs elsewhere in the window for 15% of needles,
    where "copy what followed it" is ambiguous: learned runs missed a quarter of those; 128 halves that
    (docs/synthetic_tasks.md). Four needles in slots of 8 tokens (6 slots at 64 tokens, 126 at 1024): a 2-layer
    d_model=128, 4-head model got 90% of them right by step 1000 (d_model=64: 12% after 3800 steps); one needle
    (niah_single) stayed below 11% for 3800 steps: one answer per window is too little signal. One filler
    between the haystack and the queries: with none, a needle that ends the haystack runs into the first
    query's marker and reads like a query itself: learned runs missed 42–44 of 44 such needles, and none with
    one filler.
    """

    num_keys: int = 64  # keys of the needles and the distractor pairs
    num_values: int = 128  # values, drawn with replacement
    value_length: int = 2  # value tokens per pair: the answer's length
    num_queries: int = 4  # needles, each queried once
    tokens_per_pair: int = 8  # a haystack slot's tokens: the pair and filler around it
    depth: Optional[float] = None  # the needle's slot as a fraction of the haystack; None: uniform
    query_gap: int = 1  # fillers between the haystack and the queries (they stand for RULER's question)

    def __post_init__(self) -> None:
        require(self.num_queries >= 1, self.knob("num_queries"), f"must be at least 1, got {self.num_queries}")
        require(self.num_keys > self.num_queries, self.knob("num_keys"),
                 f"must exceed {self.knob('num_queries')}={self.num_queries} (a key for each needle and one for "
                 f"distractors), got {self.num_keys}")
        require(self.num_values >= 1, self.knob("num_values"), f"must be at least 1, got {self.num_values}")
        require(self.value_length >= 1, self.knob("value_length"), f"must be at least 1, got {self.value_length}")
        require(self.tokens_per_pair >= 1 + self.value_length, self.knob("tokens_per_pair"),
                 f"must hold a key and its {self.knob('value_length')}={self.value_length} values, at least "
                 f"{1 + self.value_length}, got {self.tokens_per_pair}")
        require(self.query_gap >= 0, self.knob("query_gap"), f"must be >= 0, got {self.query_gap}")
        require(self.depth is None or 0.0 <= self.depth <= 1.0, self.knob("depth"),
                 f"must lie in [0, 1] or be None (uniform), got {self.depth}")
        require(self.depth is None or self.num_queries == 1, self.knob("depth"),
                 f"places a single needle; with {self.knob('num_queries')}={self.num_queries} leave it None (uniform)")
        finite(self, f"data.tasks.{self.name}", Needle)

    @property
    def query_length(self) -> int:
        return 2 + self.value_length

    @property
    def vocab_size(self) -> int:
        return 2 + self.num_keys + self.num_values

    def token_names(self) -> list[str]:
        return ["_", "?", *(f"k{i}" for i in range(self.num_keys)), *(f"v{i}" for i in range(self.num_values))]

    @property
    def min_length(self) -> int:
        # a slot per needle, the gap, the queries
        return self.num_queries * (self.tokens_per_pair + self.query_length) + self.query_gap - 1

    def sizes(self, length: int) -> dict[str, int]:
        return {"haystack_pairs": (length + 1 - self.query_gap - self.num_queries * self.query_length)
                                  // self.tokens_per_pair}

    def answer_length(self, length: int) -> int:
        return self.value_length

    def sample(self, length: int, generator: torch.Generator) -> Example:
        self.check_length(length)
        pairs, n, q = self.sizes(length)["haystack_pairs"], self.value_length, self.num_queries
        size = self.tokens_per_pair
        needles = torch.randperm(self.num_keys, generator=generator)[:q]
        others = torch.ones(self.num_keys, dtype=torch.bool).index_fill_(0, needles, False).nonzero().flatten()
        keys = others[torch.randint(len(others), (pairs,), generator=generator)]  # distractors: any other key
        if self.depth is None:
            at = torch.randperm(pairs, generator=generator)[:q]
        else:
            at = torch.tensor([round(self.depth * (pairs - 1))])
        keys[at] = needles
        # Value tokens may recur across pairs, and that teaches key-anchored retrieval: a needle's second value
        # token cannot always be copied from what followed its first. With the needles' values made unique, 2 of
        # 9 rotary runs learned the needle in 2000 steps, against 7 of 9 (docs/synthetic_tasks.md).
        values = 2 + self.num_keys + torch.randint(self.num_values, (pairs, n), generator=generator)
        offsets = torch.randint(size - n, (pairs,), generator=generator)  # the pair's place in its slot
        slots = torch.zeros(pairs, size, dtype=torch.int64)
        slots.scatter_(1, offsets[:, None] + torch.arange(1 + n), torch.cat([2 + keys[:, None], values], dim=1))
        asked = at[torch.randperm(q, generator=generator)]
        queries = torch.cat([torch.ones(q, 1, dtype=torch.int64), 2 + keys[asked, None], values[asked]], dim=1)
        gap = self.query_gap
        pad = length + 1 - pairs * size - gap - q * self.query_length
        first_query = pad + pairs * size + gap
        # the answer of query j is predicted from its key, one token after its marker
        starts = first_query + self.query_length * torch.arange(q) + 1
        return _example([_fill(pad, 0), slots.flatten(), _fill(gap, 0), queries.flatten()], starts, n)



def needle_misses(task: Needle, inputs: Tensor, targets: Tensor, answers: Tensor,
                  predictions: Tensor) -> dict[str, tuple[int, int]]:
    """(needles, missed) per kind of needle, a miss being any answer token wrong, on examples as `examples`
    gives them and argmax predictions of the same shape. Kinds, in this order: "recurring", the needle's first
    value token occurs more than once before its answer (so "copy what followed it" is ambiguous); "ends
    haystack", the needle's pair is the haystack's last, its values just before the query_gap fillers and the
    first query's marker; "other"."""
    counts = {kind: [0, 0] for kind in ("recurring", "ends haystack", "other")}
    for row in range(len(inputs)):
        x, y, a = inputs[row], targets[row], answers[row]
        first_marker = int(torch.nonzero(x == 1)[0])
        for k in range(int(a.max()) + 1):
            where = torch.nonzero(a == k).flatten()
            start, key = int(where[0]), int(x[where[0]])
            key_at = int(torch.nonzero(x[:first_marker] == key)[0])
            if int((x[:start] == y[start]).sum()) > 1:
                kind = "recurring"
            elif key_at + task.value_length + 1 + task.query_gap == first_marker:
                kind = "ends haystack"
            else:
                kind = "other"
            counts[kind][0] += 1
            counts[kind][1] += int(not torch.equal(predictions[row, where], y[where]))
    return {kind: (n, missed) for kind, (n, missed) in counts.items()}

@register_task("copy")
@dataclass
class Copy(TaskConfig):
    """Copy a random sequence (Jelassi et al. 2024, arXiv:2402.01032; reversed: Zhou et al. 2023,
    arXiv:2310.16028's reversal variants): `s1..sn SEP s1..sn`, or `SEP sn..s1` with reverse; the answer is
    the whole copy (n tokens, its first predicted at SEP).

    Layout: 0 filler, 1 separator, 2 .. num_symbols + 1 symbols, drawn uniformly with replacement. One filler
    at the start when the length is odd.
    Length scaling: n = length // 2, the copy is half the window at every length.
    """

    num_symbols: int = 32  # the alphabet the copied sequence is drawn from
    reverse: bool = False  # copy it backwards

    def __post_init__(self) -> None:
        require(self.num_symbols >= 1, self.knob("num_symbols"), f"must be at least 1, got {self.num_symbols}")

    @property
    def vocab_size(self) -> int:
        return 2 + self.num_symbols

    def token_names(self) -> list[str]:
        return ["_", "|", *(f"s{i}" for i in range(self.num_symbols))]

    @property
    def min_length(self) -> int:
        return 2

    def sizes(self, length: int) -> dict[str, int]:
        return {"copy_length": length // 2}

    def answer_length(self, length: int) -> int:
        return length // 2

    def sample(self, length: int, generator: torch.Generator) -> Example:
        self.check_length(length)
        n = length // 2
        sequence = 2 + torch.randint(self.num_symbols, (n,), generator=generator)
        copy = sequence.flip(0) if self.reverse else sequence
        pad = length + 1 - (2 * n + 1)
        return _example([_fill(pad, 0), sequence, torch.tensor([1]), copy], torch.tensor([pad + n]), n)


@register_task("flipflop")
@dataclass
class FlipFlop(TaskConfig):
    """Flip-flop language (Liu et al. 2023, arXiv:2306.00946; CoPE's test, Golovneva et al. 2024,
    arXiv:2405.18719): instruction–bit pairs, write (w), ignore (i) or read (r); a read's bit is the last written
    bit, and each read's bit is an answer (predicted at the r).

    Layout: 0 filler, 1 w, 2 i, 3 r, 4 bit 0, 5 bit 1. The first instruction is a write and the last a read; the
    others are w, r or i with probabilities p_write, p_read and the rest (Liu's FFL(0.8): 0.1, 0.1); bits after w
    and i are uniform. p_read = 0 leaves the final read only. One filler at the start when the length is even.
    Length scaling: (length + 1) // 2 instructions at fixed probabilities: the density of reads and writes stays,
    the sequence (and the farthest write a read may need) grows.
    """

    p_write: float = 0.1  # the chance of a write among the middle instructions
    p_read: float = 0.1  # the chance of a read; the rest are ignores

    WRITE: ClassVar[int] = 1  # ignore is WRITE + 1
    READ: ClassVar[int] = 3
    BIT: ClassVar[int] = 4  # bit b is token BIT + b

    def __post_init__(self) -> None:
        for name in ("p_write", "p_read"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, self.knob(name), f"must lie in [0, 1], got {value}")
        require(self.p_write + self.p_read <= 1.0, self.knob("p_read"),
                 f"p_write + p_read must be at most 1 (the rest are ignores), got {self.p_write} + {self.p_read}")
        finite(self, f"data.tasks.{self.name}", FlipFlop)

    @property
    def vocab_size(self) -> int:
        return 6

    def token_names(self) -> list[str]:
        return ["_", "w", "i", "r", "0", "1"]

    @property
    def min_length(self) -> int:
        return 3  # two instructions: the first write and the final read

    def sizes(self, length: int) -> dict[str, int]:
        return {"instructions": (length + 1) // 2}

    def sample(self, length: int, generator: torch.Generator) -> Example:
        self.check_length(length)
        count = self.sizes(length)["instructions"]
        u = torch.rand(count - 2, generator=generator, dtype=torch.float64)
        # u < p_write: write; u >= 1 − p_read: read; ignore between
        middle = self.WRITE + (u >= self.p_write).long() + (u >= 1.0 - self.p_read).long()
        ops = torch.cat([torch.tensor([self.WRITE]), middle, torch.tensor([self.READ])])
        bits = torch.randint(2, (count,), generator=generator)
        index = torch.arange(count)
        last_write = torch.cummax(torch.where(ops == self.WRITE, index, -1), dim=0).values
        reads = ops == self.READ
        bits[reads] = bits[last_write[reads]]
        pad = length + 1 - 2 * count
        pairs = torch.stack([ops, self.BIT + bits], dim=1).flatten()
        return _example([_fill(pad, 0), pairs], pad + 2 * index[reads], 1)


def task_config(name: str, settings: "dict | TaskConfig | None" = None) -> TaskConfig:
    """The registered task `name` with its knobs (a dict as Hydra gives it, or the config itself)."""
    SYNTHETIC_TASKS.lookup(name)
    if isinstance(settings, TaskConfig):
        require(settings.name == name, "data.task", f"got a {settings.name!r} config for task {name!r}")
        return settings
    settings = dict(settings or {})
    require(settings.pop("name", name) == name, f"data.tasks.{name}.name", f"settings for {name!r} name another task")
    return SYNTHETIC_TASKS.build(settings, f"data.tasks.{name}", name=name)
