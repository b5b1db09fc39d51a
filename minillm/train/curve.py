"""The training curve: validation loss against training tokens, from a run's metrics.csv."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional


def validation_curve(metrics_csv: Path) -> list[tuple[float, float]]:
    """(training tokens seen, val/loss) at each validation of a run's metrics.csv."""
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    # Validation rows carry no token count; every step trains on the same number of tokens.
    logged = next((r for r in rows if r.get("train/tokens")), None)
    points = []
    if logged is not None:
        per_step = float(logged["train/tokens"]) / (int(logged["step"]) + 1)
        points = sorted(((int(r["step"]) + 1) * per_step, float(r["val/loss"])) for r in rows if r.get("val/loss"))
    if not points:
        raise ValueError(f"{metrics_csv}: no rows with both val/loss and train/tokens")
    return points


def training_curve(metrics_csv: Path, out: Path, unigram_entropy: Optional[float] = None) -> Path:
    """The validation curve as a PNG, with the unigram entropy as the bar a model must get under to be
    using context at all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = validation_curve(metrics_csv)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([t / 1e6 for t, _ in points], [loss for _, loss in points], marker="o", label="validation loss")
    if unigram_entropy is not None:
        ax.axhline(unigram_entropy, color="grey", linestyle="--", label=f"unigram entropy {unigram_entropy:.2f}")
    ax.set(xlabel="training tokens seen (millions)", ylabel="loss (nats per token)", title="Validation loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
