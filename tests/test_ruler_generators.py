"""RULER's generators (minillm.data.ruler): every task against a solver that reads the answers back from the prompt
alone, the token budget met and maximal with a real BPE tokenizer, the prompts against RULER's own template strings,
determinism, the cache, and the scoring against hand-worked cases."""

from __future__ import annotations

import collections
import json
import random
import re

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minillm.data import ruler_haystacks as hay
from minillm.data.ruler import (RULER_TASKS, RulerDoesNotFit, RulerSample, cached_ruler_samples, completion,
                                ruler_samples, sample_prompt, score, string_match_all, string_match_part)
from minillm.data.ruler_tasks import CommonWords, FrequentWords, NeedleTask, PromptInputs, VariableTracking

# ---------------------------------------------------------------------------------------------------------------
# Transcribed from NVIDIA/RULER (commit c3f5e3b): scripts/data/synthetic/constants.py (TASKS: template and
# answer_prefix), scripts/data/synthetic/niah.py (the needle and the noise haystack), variable_tracking.py (the chain
# lines), scripts/synthetic.yaml (each named task's args). Test data only: the package builds its own.
RULER_TEMPLATES = {
    "niah": (
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will "
        "quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} "
        "for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are"),
    "variable_tracking": (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned "
        "the value {query}, they are: "),
    "common_words_extraction": (
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
        "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:"),
    "freq_words_extraction": (
        "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
        "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
        "What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:"),
}
RULER_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
RULER_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
RULER_VT_FIRST, RULER_VT_HOP = "VAR {a} = {value}", "VAR {b} = VAR {a} "
RULER_SYNTHETIC_YAML = {
    "niah_single_1": ("niah", dict(type_haystack="noise", type_needle_k="words", type_needle_v="numbers",
                                   num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_single_2": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                   num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_single_3": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="uuids",
                                   num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_multikey_1": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=4, num_needle_v=1, num_needle_q=1)),
    "niah_multikey_2": ("niah", dict(type_haystack="needle", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_multikey_3": ("niah", dict(type_haystack="needle", type_needle_k="uuids", type_needle_v="uuids",
                                     num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_multivalue": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=1, num_needle_v=4, num_needle_q=1)),
    "niah_multiquery": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=1, num_needle_v=1, num_needle_q=4)),
    "vt": ("variable_tracking", dict(type_haystack="noise", num_chains=1, num_hops=4)),
    "cwe": ("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": ("freq_words_extraction", dict(alpha=2.0)),
}
RULER_TOKENS_TO_GENERATE = {"niah": 128, "variable_tracking": 30, "common_words_extraction": 120,
                            "freq_words_extraction": 50}
# ---------------------------------------------------------------------------------------------------------------

# Prose for the essay haystacks: sentences closed by . ! ? and a quote, one abbreviation.
PROSE = ["Start with a small model. It trains in minutes on a laptop, and the loss curve tells you whether the data "
         "pipeline works! Do not scale up before that. Why would you? Mr. Smith said \"measure first.\" Then read the "
         "numbers twice", "A second text starts here; it has no full stop at the end of its last sentence"]
LENGTH = 1500  # every task fits (vt's worked example takes up to 500 tokens)
TASKS = list(RULER_TASKS)


@pytest.fixture(scope="module")
def count_tokens():
    """A byte-level BPE trained here on the prose, the noise, RULER's words and digits: a real tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = PROSE + [RULER_NOISE] * 4 + [" ".join(hay.common_words())] + [" ".join(map(str, range(1000)))]
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return lambda text: len(tokenizer.encode(text).ids)


@pytest.fixture(scope="module")
def samples(count_tokens):
    """Three samples of every task at LENGTH, seed 0, completion prompts."""
    return {name: ruler_samples(name, LENGTH, count_tokens, PROSE, n=3, seed=0) for name in TASKS}


# ---------------------------------------------------------------------------------------------------------------
# Reference solvers: the answers recovered from the prompt text alone


def solve_niah(text: str) -> tuple[list[str], float]:
    """The values of the keys the last question asks for, and where the first needle holding one sits."""
    question = re.search(r"\nWhat (?:are all|is) the special magic \w+ for (.+) mentioned in the provided text\?",
                         text)
    query = question.group(1)
    keys = re.split(r", and |, ", query) if ", and " in query else [query]
    context = text[text.index(" afterwards.\n") + len(" afterwards.\n"):question.start()]
    needles = re.finditer(r"One of the special magic \w+ for (.+?) is: (\S+?)\.(?=\s|$)", context)
    values = collections.defaultdict(list)
    first = {}
    for needle in needles:
        values[needle.group(1)].append(needle.group(2))
        first.setdefault(needle.group(1), needle.start())
    return [v for key in keys for v in values[key]], min(first[key] for key in keys) / len(context)


def solve_vt(text: str) -> list[str]:
    """Every variable whose chain leads to the value asked for, after the worked example, in chain order."""
    main = text[text.rindex("Memorize and track"):]
    value = re.search(r"assigned the value (\d+) in the text above\.", main).group(1)
    assigned = dict(re.findall(r"VAR ([A-Z]+) = (\d+|VAR [A-Z]+)", main))
    chain = [name for name, source in assigned.items() if source == value]
    while True:
        following = [name for name, source in assigned.items() if source == f"VAR {chain[-1]}"]
        if not following:
            return chain
        chain += following


def solve_cwe(text: str, num_cw: int) -> list[str]:
    """The num_cw words listed most often in the last list (the question's, after the worked examples)."""
    listing = text[text.rindex("appear most often.\n") + len("appear most often.\n"):text.rindex("\nQuestion:")]
    words = re.findall(r"(?:^| )\d+\. (.+?)(?= \d+\. |$)", listing)
    counts = collections.Counter(words).most_common()
    assert counts[num_cw - 1][1] > counts[num_cw][1], "the common words are not set apart"
    return [word for word, _ in counts[:num_cw]]


def solve_fwe(text: str) -> list[str]:
    """The three coded words seen most often, the dots aside."""
    coded = text[text.index("coded words. ") + len("coded words. "):text.rindex("\nQuestion:")].split(" ")
    counts = collections.Counter(coded).most_common()
    assert counts[0][0] == "..."
    assert counts[3][1] > counts[4][1], "the three answers are not set apart"
    return [word for word, _ in counts[1:4]]


@pytest.mark.parametrize("name", TASKS)
def test_a_solver_reads_the_answers_back_from_the_prompt(name, samples):
    config = RULER_TASKS[name]()
    for sample in samples[name]:
        if isinstance(config, NeedleTask):
            answers, depth = solve_niah(sample.input)
            assert sample.depth == pytest.approx(depth, abs=0.01)
        elif isinstance(config, VariableTracking):
            answers = solve_vt(sample.input)
            assert list(sample.answers) == answers  # in chain order
        elif isinstance(config, CommonWords):
            answers = solve_cwe(sample.input, config.num_cw)
        else:
            answers = solve_fwe(sample.input)
        assert sorted(sample.answers) == sorted(answers)
        assert score(sample, " ".join(answers)) == 1.0
        assert score(sample, "I do not know") == 0.0


@pytest.mark.parametrize("name", TASKS)
def test_the_prompt_fills_the_budget_and_one_unit_more_would_not_fit(name, samples, count_tokens):
    """count(input) + max_new_tokens <= length, and the same sample one haystack unit larger exceeds it."""
    config = RULER_TASKS[name]()
    inputs = PromptInputs(LENGTH, hay.essay_words(PROSE) if config.reads_prose else [], count_tokens)
    for sample in samples[name]:
        assert sample.prompt_tokens == count_tokens(sample.input)
        assert sample.prompt_tokens + sample.max_new_tokens <= LENGTH
        _, larger = sample_prompt(config, sample.haystack_units + 1, 0, sample.index, inputs, completion)
        assert count_tokens(larger) + sample.max_new_tokens > LENGTH
        assert sample_prompt(config, sample.haystack_units, 0, sample.index, inputs, completion)[1] == sample.input
    assert LENGTH - max(s.prompt_tokens + s.max_new_tokens for s in samples[name]) < 0.1 * LENGTH


def template_regex(template: str, fields: dict[str, str], tag: str = "") -> str:
    """A regex of a RULER template: each {field} its pattern the first time (a group named tag + field), the same
    text after."""
    pattern, seen, at = "", set(), 0
    for match in re.finditer(r"\{(\w+)\}", template):
        pattern += re.escape(template[at:match.start()])
        name = match.group(1)
        pattern += f"(?P={tag}{name})" if name in seen else f"(?P<{tag}{name}>{fields[name]})"
        seen.add(name)
        at = match.end()
    return pattern + re.escape(template[at:])


@pytest.mark.parametrize("name", TASKS)
def test_the_prompt_is_rulers_template_filled_in(name, samples):
    """The whole input matches RULER's template + answer prefix (as prepare.py joins them; niah's in the singular
    where one value is asked for, by niah.py's replacements), the worked examples of vt and cwe before it."""
    family, args = RULER_SYNTHETIC_YAML[name]
    template = "".join(RULER_TEMPLATES[family])
    for sample in samples[name]:
        if family == "niah":
            kind = args["type_needle_v"]
            if len(sample.answers) == 1:  # niah.py: num_needle_q * num_needle_v == 1
                for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
                    template = template.replace(old, new)
                kind = kind[:-1]
            match = re.fullmatch(template_regex(template, dict(type_needle_v=re.escape(kind), context=".*",
                                                               query=".+?")), sample.input, re.S)
            needle = template_regex(RULER_NEEDLE, dict(type_needle_v=re.escape(args["type_needle_v"]), key=".+?",
                                                       value=r"[\w-]+"))
            lines = match.group("context").split("\n")
            if args["type_haystack"] == "noise":
                noise = [line for line in lines if not re.fullmatch(needle, line)]
                assert noise == [RULER_NOISE] * sample.haystack_units
            elif args["type_haystack"] == "needle":
                assert all(re.fullmatch(needle, line) for line in lines)
                assert len(lines) == sample.haystack_units + len(sample.answers)
            else:  # the prose's first words (from the start again where it runs out), needles between sentences
                words = re.sub(needle, " ", match.group("context")).split()
                assert words == hay.first_words(hay.essay_words(PROSE), sample.haystack_units)
        elif family == "variable_tracking":
            # variable_tracking.py: the worked example (3-letter names) with its prefix, " " + its answer + "\n",
            # then "\n" and the question
            fields = dict(context=".*?", query=r"\d{5}", num_v=str(args["num_hops"] + 1))
            example, question = (template_regex(template, fields, tag) for tag in ("example_", ""))
            assert re.fullmatch(f"{example} [A-Z]{{3}}(?: [A-Z]{{3}}){{{args['num_hops']}}}\n\n{question}",
                                sample.input, re.S)
            first = template_regex(RULER_VT_FIRST, dict(a="[A-Z]{5}", value=r"\d{5}"))
            hop = template_regex(RULER_VT_HOP, dict(a="[A-Z]{5}", b="[A-Z]{5}"))
            main = sample.input[sample.input.rindex("Memorize and track"):]
            lines = main[main.index("\n\n") + 2:main.rindex("\nQuestion:")].split("\n")
            assert sum(bool(re.fullmatch(first, line)) for line in lines) == 1
            assert sum(bool(re.fullmatch(hop, line)) for line in lines) == args["num_hops"]
            assert lines.count(RULER_NOISE) == sample.haystack_units
        elif family == "common_words_extraction":
            # common_words_extraction.py: the worked example, its answer listed after a space, then the question
            example, question = (template_regex(template, dict(context=r"1\. .*?"), tag) for tag in ("example_", ""))
            assert re.fullmatch(rf"{example} 1\. .*?\n{question}", sample.input, re.S)
        else:
            assert re.fullmatch(template_regex(template, dict(context=r"[a-z. ]+")), sample.input, re.S)
        assert sample.max_new_tokens == RULER_TOKENS_TO_GENERATE[family]


def test_each_named_task_has_rulers_arguments():
    assert set(RULER_TASKS) == set(RULER_SYNTHETIC_YAML)
    for name, (_, args) in RULER_SYNTHETIC_YAML.items():
        config = RULER_TASKS[name]()
        assert config.name == name
        for knob, value in args.items():
            assert getattr(config, knob) == value, (name, knob)
    assert RULER_TASKS["niah_multiquery"]().num_keys == 4  # niah.py raises num_needle_k to num_needle_q


@pytest.mark.parametrize("config, setting", [
    (lambda: NeedleTask(type_haystack="hay"), "type_haystack"), (lambda: NeedleTask(type_needle_v="dates"),
                                                                  "type_needle_v"),
    (lambda: NeedleTask(num_needle_k=0), "num_needle_k"), (lambda: NeedleTask(num_needle_v=41), "num_needle_v"),
    (lambda: VariableTracking(num_hops=0), "num_hops"), (lambda: VariableTracking(type_haystack="needle"),
                                                         "type_haystack"),
    (lambda: CommonWords(freq_cw=3, freq_ucw=3), "freq_cw"), (lambda: FrequentWords(alpha=1.0), "alpha"),
    (lambda: FrequentWords(alpha=float("nan")), "alpha"), (lambda: FrequentWords(vocab_size=3), "vocab_size")])
def test_a_wrong_knob_is_named(config, setting):
    with pytest.raises(ValueError, match=rf"^{setting}: "):
        config()


def test_an_unknown_task_is_named():
    with pytest.raises(ValueError, match=r"unknown RULER task 'qa_1'"):
        ruler_samples("qa_1", LENGTH, len, PROSE, 1, 0)


@pytest.mark.parametrize("name", ["niah_single_1", "niah_single_2", "vt", "cwe", "fwe"])
def test_a_length_too_short_is_refused_naming_task_and_length(name, count_tokens):
    with pytest.raises(RulerDoesNotFit, match=rf"^ruler: {name} does not fit in 150 tokens"):
        ruler_samples(name, 150, count_tokens, PROSE, 1, 0)


def test_prose_tasks_need_prose(count_tokens):
    with pytest.raises(ValueError, match="niah_single_2 reads prose"):
        ruler_samples("niah_single_2", LENGTH, count_tokens, [" \n "], 1, 0)
    assert ruler_samples("niah_single_1", LENGTH, count_tokens, [], 1, 0)  # the noise haystack reads none


def test_samples_are_drawn_per_index(samples, count_tokens):
    """Sample i is the same whatever n, the same again from the same seed, another under another seed."""
    again = ruler_samples("niah_multikey_2", LENGTH, count_tokens, PROSE, n=2, seed=0)
    assert again == samples["niah_multikey_2"][:2]
    other = ruler_samples("niah_multikey_2", LENGTH, count_tokens, PROSE, n=2, seed=1)
    assert {s.answers for s in other}.isdisjoint({s.answers for s in again})
    assert len({s.input for s in samples["vt"]}) == 3


def test_a_chat_template_wraps_the_question_and_the_prefix_follows(count_tokens):
    def wrap(user):
        return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"

    sample, = ruler_samples("niah_single_2", LENGTH, count_tokens, PROSE, 1, 0, wrap=wrap)
    plain, = ruler_samples("niah_single_2", LENGTH, count_tokens, PROSE, 1, 0)
    assert sample.input.startswith("<|im_start|>user\nA special magic number is hidden")
    assert re.search(r"\?<\|im_end\|>\n<\|im_start\|>assistant\n The special magic number for .+ mentioned in the "
                     r"provided text is$", sample.input)
    assert sample.answers == plain.answers and sample.haystack_units < plain.haystack_units
    assert sample.prompt_tokens + sample.max_new_tokens <= LENGTH


def test_cwe_follows_rulers_two_settings(count_tokens):
    """Below 4096 tokens: common words 6 times, others once (example: 20 words, 3 and 1); from 4096: 30 and 3."""
    for length, (common, other), example in ((LENGTH, (6, 1), 20), (4096, (30, 3), 40)):
        sample, = ruler_samples("cwe", length, count_tokens, PROSE, 1, 0)
        lists = re.findall(r"appear most often\.\n(.*?)\nQuestion:", sample.input, re.S)
        shot, main = (collections.Counter(re.findall(r"(?:^| )\d+\. (.+?)(?= \d+\. |$)", text)) for text in lists)
        assert len(shot) == example
        assert sorted(set(main.values())) == [other, common]
        assert sorted(w for w, c in main.items() if c == common) == sorted(sample.answers)
        assert len(main) == sample.haystack_units


def test_fwe_counts_follow_zipf(count_tokens):
    sample, = ruler_samples("fwe", LENGTH, count_tokens, PROSE, 1, 0)
    coded = sample.input[sample.input.index("coded words. ") + 13:sample.input.rindex("\nQuestion:")].split(" ")
    counts = sorted(collections.Counter(coded).values(), reverse=True)
    n, norm = sample.haystack_units, sum(k ** -2.0 for k in range(1, 200000)) + 1 / 200000
    assert counts[:5] == [int(n * k ** -2.0 / norm) for k in range(1, 6)]
    assert len(collections.Counter(coded)) <= (LENGTH - 50) // 50


def test_zeta_equals_scipys():
    special = pytest.importorskip("scipy.special")
    for s in (1.1, 1.5, 2.0, 3.0, 7.5):
        assert hay.zeta(s) == pytest.approx(float(special.zeta(s)), rel=1e-13)


def test_sentences_join_back_into_the_text():
    words = hay.essay_words(PROSE)
    parts = hay.sentences(words)
    assert " ".join(parts) == " ".join(words)
    assert parts[:4] == ["Start with a small model.", "It trains in minutes on a laptop, and the loss curve tells "
                         "you whether the data pipeline works!", "Do not scale up before that.", "Why would you?"]
    assert parts[5] == "Smith said \"measure first.\""


def test_largest_fitting_keeps_its_bracket_where_counts_wobble():
    rng = random.Random(0)
    wobble = [rng.randint(0, 6) for _ in range(5000)]
    for budget in (40, 977, 4000, 12345):
        def tokens_at(units):
            return 3 * units + wobble[units] + 20

        for hint in (None, 7, budget // 3 + 50, 4000):
            units = hay.largest_fitting(tokens_at, budget, 5, hint)
            assert tokens_at(units) <= budget < tokens_at(units + 1)
    assert hay.largest_fitting(lambda units: 100 + units, 99, 1) is None


# ---------------------------------------------------------------------------------------------------------------
# Scoring: RULER's scripts/eval/synthetic/constants.py, one sample at a time


def test_string_match_all_is_the_share_of_answers_found():
    assert string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321", "1111111"]) == 2 / 3
    assert string_match_all("ALPHA-Beta", ["alpha-beta"]) == 1.0  # case ignored
    assert string_match_all("", ["x"]) == 0.0
    assert string_match_all("abc", ["b"]) == 1.0  # a substring counts


def test_string_match_part_is_one_when_any_answer_is_found():
    assert string_match_part("It is Paris.", ["paris", "Lyon"]) == 1.0
    assert string_match_part("It is Rome.", ["paris", "Lyon"]) == 0.0


def test_score_follows_the_samples_metric(samples):
    sample = samples["niah_multivalue"][0]
    reply = f"They are {sample.answers[0]} and {sample.answers[2].upper()}."
    assert score(sample, reply) == 0.5
    as_part = RulerSample(**{**sample.to_dict(), "answers": sample.answers, "metric": "part"})
    assert score(as_part, reply) == 1.0


def test_a_sample_round_trips_through_json(samples):
    for sample in samples["niah_multiquery"] + samples["cwe"]:
        assert RulerSample.from_dict(json.loads(json.dumps(sample.to_dict()))) == sample
    for broken in ({}, {**samples["cwe"][0].to_dict(), "answers": []},
                   {**samples["cwe"][0].to_dict(), "length": "4096"}, {**samples["cwe"][0].to_dict(), "metric": "x"}):
        with pytest.raises(ValueError):
            RulerSample.from_dict(broken)


# ---------------------------------------------------------------------------------------------------------------
# The cache


def test_the_cache_is_read_back_and_a_corrupt_file_is_made_again(tmp_path, count_tokens, samples):
    def cached(count=count_tokens, **kw):
        args = dict(task="niah_single_2", length=LENGTH, count_tokens=count, haystack_texts=PROSE, n=3, seed=0,
                    cache_dir=tmp_path, tokenizer_hash="bpe-1")
        return cached_ruler_samples(**{**args, **kw})

    def refuse(text):
        raise AssertionError("the cache was not read")

    first = cached()
    assert first == samples["niah_single_2"]
    files = list((tmp_path / "ruler").iterdir())
    assert len(files) == 1 and files[0].name.startswith(f"niah_single_2-{LENGTH}-")
    assert cached(count=refuse) == first  # a hit: no token counted
    for damage in ("{not json", json.dumps({"key": "other", "samples": []}), files[0].read_text()[:-40]):
        files[0].write_text(damage)
        assert cached() == first
        assert cached(count=refuse) == first  # written back whole
    for change in (dict(seed=1), dict(n=2), dict(tokenizer_hash="bpe-2"), dict(haystack_texts=PROSE[:1]),
                   dict(wrap=lambda user: f"[INST] {user} [/INST]")):
        with pytest.raises(AssertionError, match="the cache was not read"):
            cached(count=refuse, **change)


def test_the_cache_key_leaves_out_the_prose_where_the_task_reads_none(tmp_path, count_tokens):
    args = dict(length=LENGTH, count_tokens=count_tokens, n=1, seed=0, cache_dir=tmp_path, tokenizer_hash="t")
    cached_ruler_samples("niah_single_1", haystack_texts=PROSE, **args)
    cached_ruler_samples("niah_single_1", haystack_texts=["other prose."], **args)
    assert len(list((tmp_path / "ruler").iterdir())) == 1
