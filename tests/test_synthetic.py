"""Synthetic tasks: answers recoverable from the prompt by plain solvers, exact lengths and masks, seeded
determinism, length scaling, refused knobs, the answer-only loss and the accuracy counts."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.model.config import ModelConfig
from minillm.model.transformer import Transformer
from minillm.data.synthetic import (IGNORE, MQAR, SYNTHETIC_TASKS, Copy, FlipFlop, Needle, needle_misses, task_config)
from minillm.data.answers import (Accuracy, accuracy, answer_ids, answer_loss, batch, example_generator, examples, validation_set, wilson_interval)


def raises_naming(field: str):
    """ValueError whose message starts with the setting's name."""
    return pytest.raises(ValueError, match=rf"^{re.escape(field)}:")


# Every registered task at its defaults, by its registry name, and variants that move knobs off their defaults.
TASKS = {name: cls() for name, cls in SYNTHETIC_TASKS.items()}
TASKS.update({
    "mqar_uniform": MQAR(num_keys=60, num_values=5, tokens_per_pair=5, power_a=1.0),
    "mqar_hidden": MQAR(show_values=False),
    "needle_dense": Needle(num_keys=3, value_length=3, num_queries=1, tokens_per_pair=4, depth=0.5),
    "needle_queries": Needle(num_keys=4, value_length=1, num_queries=3, tokens_per_pair=5),
    "needle_gap": Needle(num_values=128, query_gap=2),
    "copy_reverse": Copy(num_symbols=3, reverse=True),
    "flipflop_final_read": FlipFlop(p_write=0.5, p_read=0.0),
})


# ----------------------------------------------------------------------------------------------
# Reference solvers: the answer from the prompt alone (the tokens up to the answer's first target), read by the
# layout each task's docstring documents. Written without the module's helpers.


def solve_mqar(task: MQAR, prompt: list[int]) -> list[int]:
    key = prompt[-1]
    assert 1 <= key <= task.num_keys, "a query is a key"
    first = prompt.index(key)  # the key's pair comes before its query
    assert first < len(prompt) - 1, "the queried key appears among the pairs"
    return [prompt[first + 1]]


def solve_needle(task: Needle, prompt: list[int]) -> list[int]:
    assert prompt[-2] == 1, "the needle's key follows the query marker"
    key, before = prompt[-1], prompt[:-2]  # the haystack and the queries answered so far
    at = [i for i, t in enumerate(before) if t == key]
    assert len(at) == 1, "the needle's key appears once in the haystack"
    return before[at[0] + 1:at[0] + 1 + task.value_length]


def solve_copy(task: Copy, prompt: list[int]) -> list[int]:
    assert prompt[-1] == 1, "the copy starts after the separator"
    sequence = [t for t in prompt[:-1] if t != 0]
    return sequence[::-1] if task.reverse else sequence


def solve_flipflop(task: FlipFlop, prompt: list[int]) -> list[int]:
    # pairs (instruction, bit) end at the read's instruction: an even prompt starts with a filler
    body = prompt[1 - len(prompt) % 2:] + [None]
    assert body[-2] == 3, "an answer is a read's bit"
    bit = None
    for op, value in zip(body[0::2], body[1::2]):
        if op == 1:
            bit = value
    return [bit]


SOLVERS = {MQAR: solve_mqar, Needle: solve_needle, Copy: solve_copy, FlipFlop: solve_flipflop}


def window(example) -> torch.Tensor:
    """The length + 1 tokens of a teacher-forced example whose last target is an answer."""
    assert int(example.targets[-1]) != IGNORE
    return torch.cat([example.inputs, example.targets[-1:]])


def check_example(task, length: int, seed: int, index: int = 0) -> None:
    example = task.sample(length, example_generator(seed, index))
    inputs, targets, answers = example.inputs, example.targets, example.answers
    assert inputs.shape == targets.shape == answers.shape == (length,)
    assert inputs.dtype == answers.dtype == targets.dtype == torch.int64
    assert 0 <= int(inputs.min()) and int(inputs.max()) < task.vocab_size
    is_answer = answers >= 0
    assert is_answer.any()
    assert torch.equal(targets == IGNORE, ~is_answer)
    assert 0 <= int(targets[is_answer].min()) and int(targets[is_answer].max()) < task.vocab_size
    following = torch.cat([inputs[1:], targets[-1:]])  # the input after each position (the last: its target)
    if isinstance(task, MQAR) and not task.show_values:  # Zoology's layout: filler follows a queried key
        assert bool((following[is_answer] == 0).all())
    else:  # teacher forcing: each answer token is the next input
        assert torch.equal(targets[is_answer], following[is_answer])
    count = int(answers.max()) + 1
    n = task.answer_length(length)
    assert int(is_answer.sum()) == count * n
    assert torch.equal(answer_ids(targets, n), answers)
    for k in range(count):
        where = torch.nonzero(answers == k).flatten()
        assert torch.equal(where, where[0] + torch.arange(n)), "an answer is a run of consecutive targets"
        prompt = inputs[:where[0] + 1].tolist()
        assert SOLVERS[type(task)](task, prompt) == targets[where].tolist()


@pytest.mark.parametrize("name", TASKS)
@pytest.mark.parametrize("length", [None, 19, 64, 257])
def test_a_reference_solver_recovers_every_answer_from_the_prompt(name, length):
    task = TASKS[name]
    for seed in range(8):
        check_example(task, task.min_length if length is None else max(length, task.min_length), seed)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(TASKS)), extra=st.integers(0, 200), seed=st.integers(0, 2 ** 32),
       index=st.integers(0, 10 ** 6))
def test_examples_are_exact_and_solvable_at_every_length(name, extra, seed, index):
    task = TASKS[name]
    check_example(task, task.min_length + extra, seed, index)


def test_each_registered_task_has_a_reference_solver():
    assert set(SOLVERS) == set(SYNTHETIC_TASKS.values())


# ----------------------------------------------------------------------------------------------
# Layouts and length scaling


def test_vocabulary_sizes_follow_the_layouts():
    assert MQAR(num_keys=10, num_values=7).vocab_size == 1 + 10 + 7
    assert Needle(num_keys=10, num_values=7).vocab_size == 2 + 10 + 7
    assert Copy(num_symbols=9).vocab_size == 2 + 9
    assert FlipFlop().vocab_size == 6


def test_mqar_holds_one_pair_per_tokens_per_pair_and_queries_each_key_once():
    task = MQAR()
    for length in (64, 256, 1024):
        pairs = task.sizes(length)["num_pairs"]
        assert pairs == length // 16
        example = task.sample(length, example_generator(0, 0))
        context = example.inputs[:2 * pairs]
        keys, values = context[0::2], context[1::2]
        assert bool(((1 <= keys) & (keys <= 64)).all()) and len(set(keys.tolist())) == pairs
        assert bool((values > 64).all())
        region = example.inputs[2 * pairs:]
        slots = region[:len(region) // 2 * 2].view(-1, 2)  # an odd region ends with one filler more
        assert len(slots) == task.sizes(length)["query_slots"]
        queries = slots[:, 0][slots[:, 0] != 0]
        assert sorted(queries.tolist()) == sorted(keys.tolist())
        value_of = dict(zip(keys.tolist(), values.tolist()))
        answered = [value_of[k] for k in queries.tolist()]
        assert example.targets[example.answers >= 0].tolist() == answered
        assert slots[:, 1][slots[:, 0] != 0].tolist() == answered, "a query shows its value after its key"
        assert bool((slots[slots[:, 0] == 0] == 0).all()) and bool((region[len(slots) * 2:] == 0).all())
        assert int(example.answers.max()) + 1 == pairs
        hidden = MQAR(show_values=False).sample(length, example_generator(0, 0))
        assert torch.equal(hidden.targets, example.targets) and hidden.inputs[2 * pairs:][1::2].eq(0).all()
    assert task.sizes(256)["num_pairs"] == 4 * task.sizes(64)["num_pairs"]


def test_mqar_gaps_follow_the_power_law():
    def mean_slot(power_a: float) -> float:
        task, slots = MQAR(tokens_per_pair=8, power_a=power_a), []
        for i in range(200):
            region = task.sample(128, example_generator(0, i)).inputs[2 * 16:][0::2]
            slots += torch.nonzero(region != 0).flatten().tolist()
        return sum(slots) / len(slots)

    # 16 queries among 48 slots: uniform slots average 23.5; power_a = 0.01 packs them near the pairs (~15).
    assert abs(mean_slot(1.0) - 23.5) < 1.0 and mean_slot(0.01) < 17


def test_mqar_refuses_more_pairs_than_keys_and_too_short_lengths():
    task = MQAR(num_keys=16, tokens_per_pair=8)
    task.check_length(128)  # 16 pairs, 16 keys
    with raises_naming("data.tasks.mqar.num_keys"):
        task.check_length(136)
    with raises_naming("data.tasks.mqar.num_keys"):
        examples(task, 1024, 1, 0, 0)
    with raises_naming("model.context_length"):
        task.check_length(7)


def test_needle_haystack_grows_with_the_length_and_its_depth_is_honoured():
    task = Needle()
    assert [task.sizes(n)["haystack_pairs"] for n in (64, 256, 1024)] == [6, 30, 126]  # (L + 1 − g − 4·4) // 8

    def slots(task: Needle, tokens: torch.Tensor) -> torch.Tensor:
        pairs, size = task.sizes(len(tokens) - 1)["haystack_pairs"], task.tokens_per_pair
        pad = len(tokens) - pairs * size - task.query_gap - task.num_queries * (2 + task.value_length)
        assert bool((tokens[:pad] == 0).all())
        return tokens[pad:pad + pairs * size].view(pairs, size)

    for depth, slot in ((0.0, 0), (1.0, 14), (0.5, 7)):  # 15 slots of 8 tokens at length 128
        task = Needle(num_queries=1, depth=depth)
        tokens = window(task.sample(128, example_generator(1, 0)))
        assert torch.nonzero(slots(task, tokens) == tokens[-3])[:, 0].tolist() == [slot]
    task, places, offsets = Needle(num_queries=1), set(), set()
    for i in range(100):
        tokens = window(task.sample(128, example_generator(2, i)))
        haystack = slots(task, tokens)
        places.add(int(torch.nonzero(haystack == tokens[-3])[0, 0]))
        for row in haystack:  # one pair per slot, filler around it
            where = torch.nonzero(row).flatten()
            assert torch.equal(where, where[0] + torch.arange(3))
            assert 2 <= int(row[where[0]]) < 66 and bool((row[where[1:]] >= 66).all())
            offsets.add(int(where[0]))
    assert len(places) > 12, "a uniform depth puts the needle all over the haystack"
    assert offsets == set(range(6)), "a pair sits anywhere in its slot"
    task = Needle(num_queries=3, tokens_per_pair=8)  # several needles, each queried once at the end
    assert task.sizes(128) == {"haystack_pairs": (129 - 12) // 8}
    example = task.sample(128, example_generator(0, 0))
    queries = window(example)[-12:].view(3, 4)
    assert bool((queries[:, 0] == 1).all()) and len(set(queries[:, 1].tolist())) == 3
    assert int(example.answers.max()) == 2
    task = Needle(num_queries=2, query_gap=3)  # the gap's fillers sit between the last slot and the first marker
    assert task.sizes(64) == {"haystack_pairs": (65 - 3 - 8) // 8} and task.min_length == 2 * (8 + 4) + 3 - 1
    for i in range(20):
        tokens = window(task.sample(64, example_generator(3, i)))
        first_marker = int(torch.nonzero(tokens == 1)[0])
        assert first_marker == 65 - 8 and bool((tokens[first_marker - 3:first_marker] == 0).all())


def test_copy_copies_half_the_window_and_flipflop_has_an_instruction_per_two_tokens():
    for length in (64, 65, 512):
        assert Copy().sizes(length) == {"copy_length": length // 2} and Copy().answer_length(length) == length // 2
        example = Copy().sample(length, example_generator(0, 0))
        assert int((example.answers == 0).sum()) == length // 2 and int(example.answers.max()) == 0
        instructions = FlipFlop().sizes(length)["instructions"]
        tokens = window(FlipFlop().sample(length, example_generator(0, 0)))
        body = tokens[len(tokens) % 2:]
        assert instructions == (length + 1) // 2 == len(body) // 2
        assert int(body[0]) == 1 and int(body[-2]) == 3, "a write first, a read last"
        assert bool((body[0::2] <= 3).all() & (body[1::2] >= 4).all())


def test_flipflop_without_reads_asks_only_the_final_read_and_densities_are_kept():
    assert int(FlipFlop(p_read=0.0).sample(500, example_generator(0, 0)).answers.max()) == 0
    ops = torch.cat([window(FlipFlop().sample(1000, example_generator(0, i)))[1::2] for i in range(20)])
    share = torch.bincount(ops, minlength=4)[1:4].double() / len(ops)
    assert torch.allclose(share, torch.tensor([0.1, 0.8, 0.1], dtype=torch.float64), atol=0.02)


# ----------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("name, knobs, field", [
    ("mqar", {"num_keys": 0}, "data.tasks.mqar.num_keys"),
    ("mqar", {"num_values": 0}, "data.tasks.mqar.num_values"),
    ("mqar", {"tokens_per_pair": 3}, "data.tasks.mqar.tokens_per_pair"),
    ("mqar", {"power_a": 0.0}, "data.tasks.mqar.power_a"),
    ("mqar", {"power_a": float("nan")}, "data.tasks.mqar.power_a"),
    ("needle", {"num_keys": 1, "num_queries": 1}, "data.tasks.needle.num_keys"),
    ("needle", {"num_keys": 3, "num_queries": 3}, "data.tasks.needle.num_keys"),
    ("needle", {"num_queries": 0}, "data.tasks.needle.num_queries"),
    ("needle", {"num_queries": 2, "depth": 0.5}, "data.tasks.needle.depth"),
    ("needle", {"num_values": 0}, "data.tasks.needle.num_values"),
    ("needle", {"value_length": 0}, "data.tasks.needle.value_length"),
    ("needle", {"depth": 1.5}, "data.tasks.needle.depth"),
    ("needle", {"query_gap": -1}, "data.tasks.needle.query_gap"),
    ("needle", {"value_length": 3, "tokens_per_pair": 3}, "data.tasks.needle.tokens_per_pair"),
    ("copy", {"num_symbols": 0}, "data.tasks.copy.num_symbols"),
    ("flipflop", {"p_write": -0.1}, "data.tasks.flipflop.p_write"),
    ("flipflop", {"p_read": 1.1}, "data.tasks.flipflop.p_read"),
    ("flipflop", {"p_write": 0.6, "p_read": 0.6}, "data.tasks.flipflop.p_read"),
    ("copy", {"symbols": 3}, "data.tasks.copy.symbols"),
    ("copy", {"name": "mqar"}, "data.tasks.copy.name"),
])
def test_bad_knobs_are_refused_naming_the_setting(name, knobs, field):
    with raises_naming(field):
        task_config(name, knobs)


def test_task_config_builds_from_a_dict_and_refuses_an_unknown_task():
    assert task_config("needle", {"name": "needle", "value_length": 3}) == Needle(value_length=3)
    assert task_config("copy", Copy(reverse=True)) == Copy(reverse=True)
    with pytest.raises(ValueError, match=r"^data\.task: unknown task 'x'; one of \['copy', 'flipflop'"):
        task_config("x")


@pytest.mark.parametrize("name", TASKS)
def test_lengths_below_the_minimum_are_refused_naming_the_context_length(name):
    task = TASKS[name]
    check_example(task, task.min_length, 0)
    with raises_naming("model.context_length"):
        task.sample(task.min_length - 1, example_generator(0, 0))


# ----------------------------------------------------------------------------------------------
# Seeded batches


@pytest.mark.parametrize("name", ["mqar", "needle", "copy", "flipflop"])
def test_batches_are_pure_functions_of_seed_and_index(name):
    task = TASKS[name]
    later = batch(task, 48, 4, seed=3, index=5)
    for b in range(5):  # earlier calls do not move the stream
        batch(task, 48, 4, seed=3, index=b)
    again = batch(task, 48, 4, seed=3, index=5)
    assert all(torch.equal(a, b) for a, b in zip(later, again))
    # batch b is samples b·size .. (b+1)·size − 1, whatever the batch size
    assert torch.equal(batch(task, 48, 8, seed=3, index=2)[0][4:], batch(task, 48, 4, seed=3, index=5)[0])
    rows = later[0]
    assert len({tuple(r.tolist()) for r in rows}) == 4, "the examples of a batch differ"
    assert not torch.equal(rows, batch(task, 48, 4, seed=4, index=5)[0])
    assert not torch.equal(rows, batch(task, 48, 4, seed=3, index=5, split="validation")[0])
    assert not torch.equal(rows, batch(task, 48, 4, seed=3, index=6)[0])


def test_the_stream_is_the_same_on_every_machine():
    # The reproducibility contract, pinned: if this changes, resumed runs and shared seeds see other data.
    assert example_generator(0, 0).initial_seed() == 15793235383387715774
    assert window(Copy(num_symbols=8).sample(8, example_generator(0, 0))).tolist() == [6, 4, 3, 3, 1, 6, 4, 3, 3]


def test_the_validation_set_is_fixed_and_apart_from_training():
    task = TASKS["mqar"]
    val = validation_set(task, 64, 10, seed=0)
    x, y, answers = val.tensors
    assert len(val) == 10 and x.shape == y.shape == answers.shape == (10, 64)
    assert torch.equal(x, validation_set(task, 64, 10, seed=0).tensors[0])
    train = {tuple(r.tolist()) for r in batch(task, 64, 10, seed=0, index=0)[0]}
    assert not train & {tuple(r.tolist()) for r in x}


# ----------------------------------------------------------------------------------------------
# Loss and accuracy


def test_the_answer_only_loss_ignores_every_prompt_position():
    x, y, answers = examples(TASKS["needle"], 64, 3, seed=0, index=0)
    logits = torch.randn(3, 64, TASKS["needle"].vocab_size, requires_grad=True)
    loss = answer_loss(logits, y)
    loss.backward()
    prompt = answers < 0
    assert bool((logits.grad[prompt] == 0).all()) and bool((logits.grad[~prompt].abs().sum(-1) > 0).all())
    shaken = logits.detach().clone()
    shaken[prompt] += 10 * torch.randn_like(shaken[prompt])
    assert torch.allclose(answer_loss(shaken, y), loss)
    manual = -torch.log_softmax(logits.detach(), -1)[~prompt].gather(1, y[~prompt][:, None]).mean()
    assert torch.allclose(loss, manual)
    # the ordinary loss of the project is the same: -100 is F.cross_entropy's default ignore_index
    assert torch.allclose(F.cross_entropy(logits.flatten(0, 1), y.flatten()), loss)
    shaken[~prompt] += 1.0 * torch.randn_like(shaken[~prompt])
    assert not torch.allclose(answer_loss(shaken, y), loss)


def test_accuracy_matches_a_hand_count():
    I = IGNORE
    targets = torch.tensor([[I, 5, 6, I, 7, 8],
                            [I, I, 1, 2, I, 3]])
    answers = torch.tensor([[-1, 0, 0, -1, 1, 1],
                            [-1, -1, 0, 0, -1, 1]])
    predictions = torch.tensor([[0, 5, 6, 9, 7, 0],  # answer 0 right; answer 1: one of two tokens right
                                [3, 3, 1, 2, 0, 4]])  # answer 0 right; answer 1 (one token) wrong
    acc = accuracy(predictions, targets, answers)
    assert acc == Accuracy(answers=4, answers_correct=2, tokens=7, tokens_correct=5)
    assert acc.exact_match == 0.5 and acc.token_accuracy == 5 / 7
    logits = F.one_hot(predictions, 10).float()
    assert accuracy(logits, targets, answers) == acc
    assert acc + acc == Accuracy(8, 4, 14, 10)
    with raises_naming("accuracy"):
        accuracy(predictions, targets, torch.zeros_like(answers))
    with raises_naming("accuracy"):
        accuracy(predictions[:, :5], targets, answers)


def test_accuracy_of_the_true_answers_is_one_and_of_wrong_copies_zero():
    x, y, answers = examples(Copy(), 64, 8, seed=0, index=0)
    perfect = accuracy(torch.where(y == IGNORE, 0, y), y, answers)
    assert perfect.answers == 8 and perfect.exact_match == 1.0 and perfect.tokens == 8 * 32
    one_off = torch.where(y == IGNORE, 0, y)
    one_off[:, -1] = 0  # the last token of every copy wrong
    acc = accuracy(one_off, y, answers)
    assert acc.exact_match == 0.0 and acc.token_accuracy == 31 / 32


def test_wilson_interval_matches_hand_values():
    low, high = wilson_interval(5, 10)
    assert math.isclose(low, 0.2366, abs_tol=1e-4) and math.isclose(high, 0.7634, abs_tol=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and math.isclose(high, 3.8416 / 13.8416, abs_tol=1e-4)  # z²/(n + z²) at p = 0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    narrow = wilson_interval(500, 1000)
    assert narrow[1] - narrow[0] < high - low and narrow[0] < 0.5 < narrow[1]


def test_a_model_sized_by_the_task_trains_on_its_batches():
    task = TASKS["flipflop"]
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=task.vocab_size, context_length=32, d_model=32, n_layers=1, n_heads=2))
    x, y = batch(task, 32, 16, seed=0, index=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = answer_loss(model(x), y)
    for _ in range(20):
        loss = answer_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss < first * 0.5


def test_needle_misses_counts_each_kind_as_a_hand_count_does():
    task = Needle(num_keys=4, num_values=4, value_length=2, num_queries=2, tokens_per_pair=3)
    # keys 2..5, values 6..9; haystack: (k2 v6 v7) (k3 v8 v6) (k4 v9 v9), then queries ? k3 v8 v6 | ? k4 v9 v9
    window = torch.tensor([2, 6, 7, 3, 8, 6, 4, 9, 9, 1, 3, 8, 6, 1, 4, 9, 9])
    inputs, targets = window[:-1][None], torch.full((1, 16), IGNORE)
    answers = torch.full((1, 16), -1)
    for k, start in enumerate((10, 14)):  # each answer is predicted from its key, at the key's position
        targets[0, start:start + 2] = window[start + 1:start + 3]
        answers[0, start:start + 2] = k
    predictions = targets.clone()
    assert needle_misses(task, inputs, targets, answers, predictions) == {
        "recurring": (1, 0), "ends haystack": (0, 0), "other": (1, 0)}  # v9 recurs; v8 does not, k3 is not last
    predictions[0, 11] = 7  # the first needle's second token wrong
    predictions[0, 15] = 6
    counts = needle_misses(task, inputs, targets, answers, predictions)
    assert counts == {"recurring": (1, 1), "ends haystack": (0, 0), "other": (1, 1)}
    task_gap = Needle(num_keys=4, num_values=4, value_length=2, num_queries=1, tokens_per_pair=3, query_gap=1)
    window = torch.tensor([2, 6, 7, 3, 8, 9, 0, 1, 3, 8, 9])  # k3's pair ends the haystack, one filler after it
    inputs, targets, answers = window[:-1][None], torch.full((1, 10), IGNORE), torch.full((1, 10), -1)
    targets[0, 8:10], answers[0, 8:10] = window[9:11], 0
    assert needle_misses(task_gap, inputs, targets, answers, targets.clone()) == {
        "recurring": (0, 0), "ends haystack": (1, 0), "other": (0, 0)}
