"""LongPPL (Fang et al. 2024, arXiv:2410.23771): perplexity on the key tokens, those whose prediction needs the long
context, over the perplexity windows: the functions, their record and measurement."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from minillm.eval.grouping import length_table
from minillm.eval.measurement import Measurement, Reading, Table, register_measurement
from minillm.eval.perplexity import MAX_ATTENTION_PAIRS, _window_plan, evaluation_tokens
from minillm.eval.records import Record, Results, Setting
from minillm.model.transformer import Transformer
from minillm.positions.methods import AttentionMethod, attention_method
from minillm.positions.scaling import Scaling


@dataclass
class LongPPLRecord(Record):
    """LongPPL of a model at one setting and length, on the key tokens an evaluator picked in the perplexity windows
    of that length; longppl None (with a note) where no token is key or the setting does not apply."""

    length: int
    key_tokens: int = 0
    tokens: int = 0  # targets scored (the perplexity windows')
    key_share: Optional[float] = None  # key_tokens / tokens
    longppl: Optional[float] = None  # exp(mean loss over the key tokens)
    ppl: Optional[float] = None  # exp(mean loss over every target scored): perplexity on the same tokens
    short: int = 0  # tokens of context the evaluator's short pass saw (at least)
    alpha: float = 0.0
    beta: float = 0.0
    evaluator: str = "itself"  # the model that picked the key tokens: itself, or config.longppl_evaluator
    applicable: bool = True
    note: Optional[str] = None
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------
# Per-token losses over the perplexity windows


def _batches(rows: int, size: int, batch_size: int) -> list[Tensor]:
    """Row groups of at most batch_size windows of `size` tokens, and at most MAX_ATTENTION_PAIRS pairs a pass."""
    return list(torch.arange(rows).split(max(1, min(batch_size, MAX_ATTENTION_PAIRS // size**2))))


@torch.inference_mode()
def window_losses(model: Transformer, tokens: Tensor, length: int, *, attention: "str | AttentionMethod" = "full",
                  scaling: Optional[Scaling] = None, logn: bool = False, stride: Optional[int] = None,
                  batch_size: int = 4) -> tuple[Tensor, Tensor]:
    """The loss of every target of `tokens` (n_docs, T + 1) in the windows of `length` that perplexity_at_length
    scores (minillm.eval.perplexity: the same plan, stride included): (losses, scored) both (n_docs, T), losses 0
    where not scored."""
    device = next(model.parameters()).device
    method = attention_method(attention) if isinstance(attention, str) else attention
    n_docs, total = tokens.shape[0], tokens.shape[1] - 1
    losses, scored = torch.zeros(n_docs, total), torch.zeros(n_docs, total, dtype=torch.bool)
    for begin, end, scored_from in _window_plan(total, length, stride):
        for rows in _batches(n_docs, end - begin, batch_size):
            x, y = tokens[rows, begin:end].to(device), tokens[rows, begin + 1:end + 1].to(device)
            got = model.token_losses(x, y, attention=method, scaling=scaling, logn=logn).float().cpu()
            losses[rows, begin + scored_from:end] = got[:, scored_from:]
            scored[rows, begin + scored_from:end] = True
    return losses, scored


@torch.inference_mode()
def short_context_losses(model: Transformer, chunks: Tensor, short: int, step: int, batch_size: int = 4) -> Tensor:
    """The loss of each target of `chunks` (n, L + 1 tokens; target j is token j + 1) read with a short context, as
    the longppl package's find_key_token does: sub-windows starting every `step` tokens, each holding `short`
    tokens of context and then the `step` targets it scores, so a target sees between short and short + step − 1
    tokens. (n, L), NaN for targets with fewer than `short` tokens before them (their context is short already)."""
    device = next(model.parameters()).device
    n, tokens = chunks.shape
    losses = torch.full((n, tokens - 1), math.nan)
    for start in range(0, tokens - short, step):
        end = min(start + short + step, tokens)  # the last sub-window is cut at the chunk's end
        for rows in _batches(n, end - 1 - start, batch_size):
            got = model.token_losses(chunks[rows, start:end - 1].to(device), chunks[rows, start + 1:end].to(device))
            # token t (target t − 1) of [start + short, end): its loss at sub-window offset t − start − 1
            losses[rows, start + short - 1:end - 1] = got[:, short - 1:].float().cpu()
    return losses


def key_token_mask(full_losses: Tensor, short_losses: Tensor, alpha: float, beta: float) -> Tensor:
    """Key tokens (arXiv:2410.23771, eq. 4-5, with the longppl package's strict inequalities): the long context
    raises the log-probability by more than alpha, log p(full) − log p(short) > alpha, and the full-context
    log-probability is above beta, log p(full) > beta. A target without a short loss (NaN) is never key."""
    return ((short_losses - full_losses) > alpha) & (-full_losses > beta)


@torch.inference_mode()
def key_tokens(evaluator: Transformer, tokens: Tensor, length: int, *, short: int, alpha: float, beta: float,
               step: Optional[int] = None, stride: Optional[int] = None, batch_size: int = 4) -> Tensor:
    """Which targets of `tokens` (n_docs, T + 1) are key at `length`: the evaluator read as trained (no scaling,
    full attention), its full-context losses from each perplexity window, its short-context losses from
    sub-windows of that window (short_context_losses; step None: short // 4, the package's 1024 per 4096). A
    window is the package's text: its first `short` targets have no short context and are never key.
    (n_docs, T) bool."""
    step = step or max(1, short // 4)
    n_docs, total = tokens.shape[0], tokens.shape[1] - 1
    full, scored = window_losses(evaluator, tokens, length, stride=stride, batch_size=batch_size)
    mask = torch.zeros(n_docs, total, dtype=torch.bool)
    for begin, end, scored_from in _window_plan(total, length, stride):  # each target from the window scoring it
        short_losses = short_context_losses(evaluator, tokens[:, begin:end + 1], short, step, batch_size)
        mask[:, begin + scored_from:end] = key_token_mask(full[:, begin + scored_from:end],
                                                          short_losses[:, scored_from:], alpha, beta)
    return mask & scored


@dataclass
class LongPPL:
    """One model at one length on given key tokens."""

    key_tokens: int
    tokens: int
    key_share: float
    longppl: Optional[float]  # None: no key token
    ppl: float


def _exp(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709


def longppl(losses: Tensor, scored: Tensor, key: Tensor) -> LongPPL:
    """LongPPL = exp(mean loss over the key tokens) (arXiv:2410.23771, eq. 6), beside exp(mean loss over every
    scored target), from a model's window_losses and key_tokens' mask."""
    key = key & scored
    count, total = int(key.sum()), int(scored.sum())
    return LongPPL(count, total, count / total if total else 0.0,
                   _exp(float(losses[key].mean())) if count else None, _exp(float(losses[scored].mean())))


# ----------------------------------------------------------------------------------------------
# The evaluator and the measurement


def _evaluator_and_tokenizer(location: str, cache_dir: Optional[str]):
    """The model and tokenizer `location` names, loaded as the evaluation loads a ckpt."""
    from minillm.data.tokens import read_tokenizer
    from minillm.interop.pretrained import PretrainedSource, is_pretrained
    from minillm.runs import find_runs

    if is_pretrained(location):
        imported = PretrainedSource.parse(location).load()
        return imported.model, imported.tokenizer
    runs = find_runs(location, cache_dir)
    if len(runs) != 1:
        raise ValueError(f"{location} holds {len(runs)} runs, name one")
    if not runs[0].has_run_files():
        raise ValueError(f"{runs[0].folder} lacks tokenizer.json (not a training run folder)")
    return runs[0].load_model(), read_tokenizer(runs[0].tokenizer, "tokenizer")


def load_evaluator(location: str, tokenizer, cache_dir: Optional[str], device: torch.device) -> Transformer:
    """config.longppl_evaluator's model (a run folder or .ckpt of ours, or hf:... / .gguf), refused by name unless
    its tokenizer has `tokenizer`'s vocabulary: key tokens are positions of one tokenization."""
    try:
        model, own = _evaluator_and_tokenizer(location, cache_dir)
    except (ValueError, OSError) as error:  # the loaders name ckpt, the setting they usually read
        raise ValueError(f"longppl_evaluator: {str(error).removeprefix('ckpt: ')}") from error
    if tokenizer is None or own.get_vocab(with_added_tokens=True) != tokenizer.get_vocab(with_added_tokens=True):
        raise ValueError(f"longppl_evaluator: {location} has another tokenizer than the model it evaluates: key "
                         f"tokens are picked per token, so the evaluator must share the tokenization")
    return model.to(device).eval()


@register_measurement("longppl")
class LongPPLMeasurement(Measurement):
    """LongPPL (arXiv:2410.23771) of a text model at each setting when config.longppl: key tokens picked once per
    length by the evaluator (the model itself, or config.longppl_evaluator) read as trained, then the model's losses
    on them under each setting's scaling and attention method, from the perplexity windows' tokens."""

    record = LongPPLRecord
    csv = "longppl.csv"

    def __init__(self, subject, plan, config):
        super().__init__(subject, plan, config)
        self.tokens = evaluation_tokens(subject.documents, max(plan.lengths), config.max_documents)
        self.short = config.longppl_short or subject.setting.trained_length
        self.evaluator = subject.model if config.longppl_evaluator is None else load_evaluator(
            config.longppl_evaluator, subject.tokenizer, config.data.cache_dir, next(subject.model.parameters()).device)
        self.keys: dict[int, Tensor] = {}  # length -> key-token mask, shared by every setting

    @classmethod
    def applies(cls, subject, config) -> bool:
        return super().applies(subject, config) and config.longppl

    @classmethod
    def cells(cls, plan, trained_length, config) -> int:
        return super().cells(plan, trained_length, config) if config.longppl else 0

    def measure(self, reading: Reading) -> list[LongPPLRecord]:
        config, length = self.config, reading.length
        started = time.perf_counter()
        if length not in self.keys:
            self.keys[length] = key_tokens(self.evaluator, self.tokens, length, short=self.short,
                                           alpha=config.longppl_alpha, beta=config.longppl_beta, stride=config.stride,
                                           batch_size=config.batch_size)
        losses, scored = window_losses(reading.model, self.tokens, length, **reading.read, stride=config.stride,
                                       batch_size=config.batch_size)
        found = longppl(losses, scored, self.keys[length])
        note = None if found.key_tokens else (
            f"no key token: longppl_short={self.short} leaves no target a shorter context" if self.short >= length
            else f"no key token: no target gains more than alpha={config.longppl_alpha} nats from the long context "
                 f"with a log-probability above beta={config.longppl_beta}")
        return [LongPPLRecord(reading.setting, length, **vars(found), short=self.short, alpha=config.longppl_alpha,
                              beta=config.longppl_beta, evaluator=config.longppl_evaluator or "itself", note=note,
                              seconds=round(time.perf_counter() - started, 3))]

    def does_not_apply(self, setting: Setting, length: int, note: str) -> list[LongPPLRecord]:
        return [LongPPLRecord(setting, length, applicable=False, note=note)]

    @classmethod
    def tables(cls, results: Results) -> list[Table]:
        [table] = super().tables(results)
        table.plot = ("longppl_vs_length", "length", "longppl", "LongPPL against length")
        return [table]

    @classmethod
    def figures(cls, results: Results, out_dir: Path) -> list[Path]:
        from minillm.eval.plots import plot_longppl

        path = plot_longppl(results.of(cls.record), out_dir)
        return [path] if path else []

    @classmethod
    def heading(cls, records: list[LongPPLRecord]) -> str:
        return "LongPPL against evaluation length"

    @classmethod
    def table(cls, records: list[LongPPLRecord], results: Results) -> str:
        return longppl_section(records)


def longppl_section(records: list[LongPPLRecord]) -> str:
    """LongPPL per length, the perplexity on the same tokens, and the share of key tokens, with how to read them."""
    measured = [r for r in records if r.applicable]
    knobs = sorted({(r.short, r.alpha, r.beta, r.evaluator) for r in measured})
    said = "; ".join(f"short context {s} tokens, α={a:g}, β={b:g}, evaluator {e}" for s, a, b, e in knobs)
    return (f"LongPPL (Fang et al. 2024, arXiv:2410.23771): perplexity on the key tokens only, the targets whose "
            f"log-probability gains more than α nats from the full window over a short context and exceeds β "
            f"({said or 'none measured'}). "
            f"Key tokens are picked once per length by the evaluator read as trained, so every scaling and attention "
            f"method is scored on the same tokens; n/a: no key token at that length (at the training length the short "
            f"context is the whole window; longppl.csv's note says why) or not measured.\n\n"
            + length_table(records, lambda r: r.longppl if r.applicable else None, "LongPPL @ {}")
            + "\n\nPerplexity on the same windows' tokens:\n\n"
            + length_table(records, lambda r: r.ppl if r.applicable else None, "ppl @ {}")
            + "\n\nShare of the tokens that are key (%):\n\n"
            + length_table(records, lambda r: 100 * r.key_share if r.applicable and r.key_share is not None else None,
                           "key % @ {}"))
