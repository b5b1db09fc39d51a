"""Passkey retrieval: the prompt at a length and depth, greedy decoding of the key."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from minillm.eval.config import EvalConfig
from minillm.eval.perplexity import scaling_for
from minillm.eval.records import ModelInfo, PasskeyRecord
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
# The evaluation loop


def measure_passkey(model: Transformer, tokenizer, filler: np.ndarray, lengths: list[int], methods: list[str],
             attention: dict[str, AttentionMethod], config: EvalConfig, info: ModelInfo,
             progress) -> list[PasskeyRecord]:
    """Passkey retrieval at each (scaling, attention, length, depth), every setting on the same prompts (a paired
    comparison); a length too short for the prompt is skipped. attention: the served methods by their names."""
    rng = np.random.default_rng(config.seed)
    trained = model.cfg.context_length
    suffix = "+logn" if config.logn else ""
    prompts: dict[tuple[int, float], list[PasskeyPrompt]] = {}
    for length in lengths:
        try:
            for depth in config.passkey_depths:
                prompts[length, depth] = [passkey_prompt(tokenizer, filler, length, depth, rng)
                                          for _ in range(config.passkey_trials)]
        except PasskeyDoesNotFit as error:
            log.warning("passkey at length %d skipped for %s: %s", length, info.run, error)
            for depth in config.passkey_depths:
                prompts.pop((length, depth), None)
    records = []
    for method in methods:
        for name, served in attention.items():
            for (length, depth), trials_at in prompts.items():
                scaling = scaling_for(method, length, trained, config.scaling_factor)
                trials = [passkey_trial(model, prompt, served, scaling, config.logn) for prompt in trials_at]
                records.append(PasskeyRecord(info.model, info.run, info.seed, method, name + suffix, length, depth,
                                             len(trials), sum(t[0] for t in trials) / len(trials),
                                             sum(t[1] for t in trials) / len(trials)))
                progress.update(len(trials))
    return records
