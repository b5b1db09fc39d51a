"""Passkey retrieval: the prompt at a length and depth, greedy decoding of the key; its record and measurement."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from minillm.eval.grouping import ATTENTION_ORDER, SCALING_ORDER, markdown_table, rank
from minillm.eval.measurement import Measurement, Reading, register_measurement
from minillm.eval.records import Record, Results, Setting
from minillm.model.transformer import Transformer
from minillm.positions.methods import AttentionMethod
from minillm.positions.scaling import Scaling

log = logging.getLogger("minillm")

# ----------------------------------------------------------------------------------------------
# Passkey retrieval (Mohtashami & Jaggi 2023, arXiv:2305.16300)

PASSKEY_INTRO = "\n# The pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "\n# What is the pass key? The pass key is"


class PasskeyDoesNotFit(ValueError):
    """A passkey prompt of the requested length leaves no room for filler (or the corpus has too little)."""


@dataclass
class PasskeyPrompt:
    tokens: Tensor  # prompt followed by the key's tokens
    answer_start: int  # index of the key's first token (the answer)
    key_position: int  # where the key's sentence begins in the prompt
    key: str


def passkey_prompt(tokenizer, filler: np.ndarray, length: int, depth: float, rng: np.random.Generator) -> PasskeyPrompt:
    """A random 5-digit key in a sentence placed at `depth` (0: start, 1: end) of filler drawn from the
    corpus, then the question; `length` tokens in all, the answer included. The key sentence starts after
    round(depth · n_filler) filler tokens. Raises PasskeyDoesNotFit when `length` leaves no filler."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth: must lie in [0, 1], got {depth}")
    key = str(rng.integers(10000, 100000))
    intro = tokenizer.encode(PASSKEY_INTRO.format(key=key)).ids
    question = tokenizer.encode(PASSKEY_QUESTION).ids
    answer = tokenizer.encode(" " + key).ids
    n_filler = length - len(intro) - len(question) - len(answer)
    if n_filler < 1:
        raise PasskeyDoesNotFit(f"passkey: a prompt of {length} tokens leaves no room for filler (the key "
                                f"sentence, question and answer take {length - n_filler} tokens)")
    if len(filler) < n_filler:
        raise PasskeyDoesNotFit(f"passkey: {n_filler} filler tokens needed, the corpus given has {len(filler)}")
    start = int(rng.integers(0, len(filler) - n_filler + 1))
    chunk = filler[start:start + n_filler].tolist()
    cut = round(depth * n_filler)
    prompt = chunk[:cut] + intro + chunk[cut:] + question
    return PasskeyPrompt(torch.tensor(prompt + answer), len(prompt), cut, key)


@torch.inference_mode()
def passkey_trial(model: Transformer, prompt: PasskeyPrompt, attention: Optional[AttentionMethod] = None,
                  scaling: Optional[Scaling] = None, logn: bool = False) -> tuple[bool, float]:
    """Greedy exact match and the log-probability of the key's tokens, from one teacher-forced pass under
    `attention` (None: full causal attention): greedy decoding reproduces the key's tokens exactly when each is
    the argmax given the ones before. (A greedy output that spells the key with other tokens counts as a miss.)"""
    device = next(model.parameters()).device
    tokens = prompt.tokens.to(device)[None]
    hidden = model.hidden_states(tokens[:, :-1], attention=attention, scaling=scaling, logn=logn)[0, prompt.answer_start - 1:]
    logits = model.head(hidden).float()  # the LM head on the answer positions only
    answer = tokens[0, prompt.answer_start:]
    log_probs = logits.log_softmax(-1).gather(-1, answer[:, None]).squeeze(-1)
    return bool((logits.argmax(-1) == answer).all()), float(log_probs.sum())


# ----------------------------------------------------------------------------------------------
# The measurement


@dataclass
class PasskeyRecord(Record):
    """Passkey retrieval at one setting, length and depth: greedy exact match and the key's log-probability."""

    length: int
    depth: float
    trials: int
    exact_match: float
    key_logprob: float  # mean log-probability of the key's tokens (nats)


@register_measurement("passkey")
class PasskeyMeasurement(Measurement):
    """config.passkey_trials prompts per (length, depth), drawn once for every setting of a model (a paired
    comparison); a length too short for the prompt is skipped with a warning."""

    record = PasskeyRecord
    csv = "passkey.csv"

    @classmethod
    def applies(cls, subject, config) -> bool:
        return super().applies(subject, config) and config.passkey_trials > 0

    @classmethod
    def cells(cls, plan, trained_length, config) -> int:
        """One cell per (setting, depth), each of config.passkey_trials prompts."""
        return super().cells(plan, trained_length, config) * len(config.passkey_depths) if config.passkey_trials else 0

    def __init__(self, subject, plan, config):
        super().__init__(subject, plan, config)
        filler = np.concatenate([d for d in subject.documents if len(d) >= min(plan.lengths) + 1])
        rng = np.random.default_rng(config.seed)
        self.prompts: dict[tuple[int, float], list[PasskeyPrompt]] = {}
        for length in plan.reachable:
            try:
                for depth in config.passkey_depths:
                    self.prompts[length, depth] = [passkey_prompt(subject.tokenizer, filler, length, depth, rng)
                                                   for _ in range(config.passkey_trials)]
            except PasskeyDoesNotFit as error:
                log.warning("passkey at length %d skipped for %s: %s", length, subject.setting.run, error)
                for depth in config.passkey_depths:
                    self.prompts.pop((length, depth), None)

    def measure(self, reading: Reading) -> list[PasskeyRecord]:
        records = []
        for depth in self.config.passkey_depths:
            prompts = self.prompts.get((reading.length, depth))
            if prompts is None:
                continue
            trials = [passkey_trial(reading.model, prompt, reading.attention, reading.scaling, reading.setting.logn)
                      for prompt in prompts]
            records.append(PasskeyRecord(reading.setting, reading.length, depth, len(trials),
                                         sum(t[0] for t in trials) / len(trials),
                                         sum(t[1] for t in trials) / len(trials)))
        return records

    @classmethod
    def heading(cls, records: list[PasskeyRecord]) -> str:
        return "Passkey retrieval"

    @classmethod
    def table(cls, records: list[PasskeyRecord], results: Results) -> str:
        return passkey_table(records)


def passkey_table(records: list[PasskeyRecord]) -> str:
    """Markdown: exact-match accuracy per depth and overall, and the mean key log-probability, per
    model × scaling × attention × length (seeds and runs pooled)."""
    if not records:
        return ""
    depths = sorted({r.depth for r in records})
    groups: dict[tuple[Setting, int], list[PasskeyRecord]] = defaultdict(list)
    for r in records:
        row = Setting(model=r.setting.model, scaling=r.setting.scaling, attention=r.setting.attention,
                      logn=r.setting.logn)
        groups[row, r.length].append(r)
    header = ["model", "scaling", "attention", "length", "trials"] + [f"depth {d:g}" for d in depths] + \
             ["exact match", "key log-prob (nats)"]
    def order(item) -> tuple:
        (row, length), _ = item
        return row.model, rank(row.scaling, SCALING_ORDER), rank(row.attention_label, ATTENTION_ORDER), length

    rows = []
    for (row, length), group in sorted(groups.items(), key=order):
        trials = sum(g.trials for g in group)
        per_depth = []
        for depth in depths:
            at = [g for g in group if g.depth == depth]
            n = sum(g.trials for g in at)
            per_depth.append(f"{sum(g.exact_match * g.trials for g in at) / n:.0%}" if n else "n/a")
        accuracy = sum(g.exact_match * g.trials for g in group) / trials
        logprob = sum(g.key_logprob * g.trials for g in group) / trials
        rows.append([row.model, row.scaling, row.attention_label, str(length), str(trials), *per_depth,
                     f"{accuracy:.0%}", f"{logprob:.2f}"])
    return markdown_table(header, rows)
