"""ReRoPE's protocol: the loss on each document's same last tokens, read with more and more context before them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from minillm.eval.grouping import length_table
from minillm.eval.measurement import Measurement, Reading, Table, register_measurement
from minillm.eval.perplexity import MAX_ATTENTION_PAIRS, evaluation_tokens
from minillm.eval.records import Record, Results
from minillm.model.transformer import Transformer
from minillm.positions.methods import AttentionMethod, attention_method
from minillm.positions.scaling import Scaling


@torch.inference_mode()
def tail_loss(model: Transformer, tokens: Tensor, length: int, targets: int, *,
              attention: "str | AttentionMethod" = "full", scaling: Optional[Scaling] = None, logn: bool = False,
              batch_size: int = 4) -> tuple[float, int]:
    """Mean loss (and count) of the last `targets` targets of each document of `tokens` (n_docs, T + 1), read
    by one window of `length` tokens ending at the document's end: the same targets at every length."""
    device = next(model.parameters()).device
    method = attention_method(attention) if isinstance(attention, str) else attention
    total = tokens.shape[1] - 1
    if not targets <= length <= total:
        raise ValueError(f"length: a window of {length} tokens cannot score the last {targets} of {total} targets")
    losses = []
    for rows in torch.arange(tokens.shape[0]).split(max(1, min(batch_size, MAX_ATTENTION_PAIRS // length**2))):
        x = tokens[rows, total - length:total].to(device)
        y = tokens[rows, total - length + 1:total + 1].to(device)
        losses.append(model.token_losses(x, y, attention=method, scaling=scaling, logn=logn)[:, -targets:].float().cpu())
    scored = torch.cat(losses)
    return float(scored.mean()), int(scored.numel())



@dataclass
class TailLossRecord(Record):
    """The mean loss on the same last `targets` tokens of each document (targets = the training length), read with
    `length` tokens of context in all. More context helping lowers it; windowed perplexity mixes that with position."""

    length: int
    targets: int
    loss: float
    tokens: int


@register_measurement("tail")
class TailLossMeasurement(Measurement):
    """tail_loss at every length from the training length up (config.tail_loss)."""

    record = TailLossRecord
    csv = "tail_loss.csv"

    @classmethod
    def applies(cls, subject, config) -> bool:
        return super().applies(subject, config) and config.tail_loss

    @classmethod
    def cells(cls, plan, trained_length, config) -> int:
        if not config.tail_loss:
            return 0
        return len(plan.scalings) * len(plan.served) * sum(n >= trained_length for n in plan.reachable)

    def __init__(self, subject, plan, config):
        super().__init__(subject, plan, config)
        self.tokens = evaluation_tokens(subject.documents, max(plan.lengths), config.max_documents)

    def measure(self, reading: Reading) -> list[TailLossRecord]:
        trained = reading.model.cfg.context_length
        if reading.length < trained:  # the same last `trained` targets at every length
            return []
        loss, tokens = tail_loss(reading.model, self.tokens, reading.length, trained, **reading.read,
                                 batch_size=self.config.batch_size)
        return [TailLossRecord(reading.setting, reading.length, trained, loss, tokens)]

    @classmethod
    def tables(cls, results: Results) -> list[Table]:
        [table] = super().tables(results)
        table.name, table.plot = "tail_loss", ("tail_loss_vs_context", "length", "loss",
                                               "Loss on the last L tokens against context")
        return [table]

    @classmethod
    def heading(cls, records: list[TailLossRecord]) -> str:
        return f"Loss on the last {records[0].targets} tokens against the context read (ReRoPE's protocol)"

    @classmethod
    def table(cls, records: list[TailLossRecord], results: Results) -> str:
        return tail_table(records)

    @classmethod
    def figures(cls, results: Results, out_dir: Path) -> list[Path]:
        from minillm.eval.plots import plot_tail

        records = results.of(cls.record)
        return [plot_tail(records, out_dir)] if records else []


def tail_table(records: list[TailLossRecord]) -> str:
    """Markdown: the loss on each document's last L tokens (L = training length) against the context read
    before and with them (mean ± std over seeds); falling along a row means the extra context helps."""
    return length_table(records, lambda r: r.loss, "context {}") if records else ""
