"""The training loss: our fused LM head + cross-entropy (minillm.kernels.linear_cross_entropy) against the
unfused formula that transformers' LlamaForCausalLM runs (logits = hidden @ Wᵀ, then F.cross_entropy).

Peers, forward + backward on the same hidden states, weight and targets (their losses and gradients are
checked equal first):
    fused    chunks of tokens; each chunk's logits become its gradient in place; no full logit matrix
    unfused  the (tokens, vocab) logits, their log-softmax and its gradient, each at full size

Shapes: the training steps of model=tiny and model=small with the 4k vocabulary, and a 32k vocabulary
(LLaMA 2's) at which the logits alone take 4 bytes × tokens × 32000. Each precision of the run (Settings.precisions:
float32; bf16 = autocast to bfloat16, as bf16-mixed training does) measures both peers in it. Each peer is timed in a process of its own (common.PeerProcess): beside each
other, the unfused peer's step moved between 0.6x and 1.3x of its own speed from run to run. Peak memory:
CUDA max_memory_allocated, minus what was allocated before; CPU the resident-set growth of one call in a
fresh process (common.resident_growth).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from common import (Settings, autocast, peer_processes, print_table, probe_in_fresh_process, resident_growth,
                    speedup, time_samplers)
from minillm.kernels import linear_cross_entropy

PEERS = ("fused", "unfused")


def shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int]]:
    """(tokens, d_model, vocab) per case."""
    if quick:
        return [(64, 16, 128)]
    if device.type == "cuda":
        return [(16384, 768, 32000), (16384, 2048, 128256)]
    return [(4096, 128, 4096), (2048, 384, 4096), (2048, 512, 32000)]


def inputs(tokens: int, dim: int, vocab: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, dim, generator=g).to(device).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) * dim ** -0.5).to(device).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    return hidden, weight, targets


def loss_step(peer: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, precision: str,
              keep_grads: bool = True):
    """One forward + backward of `peer` in `precision`; returns the loss. Gradients land in hidden.grad and
    weight.grad, or are dropped at the end (keep_grads=False: a memory probe's baseline then holds none from the
    call before)."""

    def step() -> torch.Tensor:
        hidden.grad = weight.grad = None
        with autocast(hidden.device, precision):
            if peer == "fused":
                loss = linear_cross_entropy(hidden, weight, targets)
            else:
                loss = F.cross_entropy((hidden @ weight.T).float(), targets)
        loss.backward()
        if not keep_grads:
            hidden.grad = weight.grad = None
        return loss

    return step


def build_loss_step(peer: str, precision: str, tokens: int, dim: int, vocab: int, device: torch.device):
    """In the peer's own process: its inputs and its step (common.PeerProcess)."""
    return loss_step(peer, *inputs(tokens, dim, vocab, device), precision), {}


def peak_memory(cases: list[tuple[str, str, int, int, int]], device: torch.device) -> dict[tuple, int]:
    """Bytes per (peer, precision, tokens, dim, vocab) that one forward + backward holds at its peak."""
    if device.type == "cpu":
        return {tuple(case): peak for *case, peak in probe_in_fresh_process(__file__, cases)}
    peaks = {}
    for peer, precision, *shape in cases:
        step = loss_step(peer, *inputs(*shape, device), precision, keep_grads=False)
        step()  # warm-up
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        peaks[(peer, precision, *shape)] = torch.cuda.max_memory_allocated(device) - before
        del step
    torch.cuda.empty_cache()  # the timed peers run in processes of their own
    return peaks


def _probe(cases: list[tuple[str, str, int, int, int]]) -> None:
    """In a fresh CPU process: resident-set growth of each case, printed as JSON."""
    print(json.dumps([(peer, precision, *shape,
                       resident_growth(loss_step(peer, *inputs(*shape, torch.device("cpu")), precision, keep_grads=False)))
                      for peer, precision, *shape in cases]))


def run(settings: Settings) -> dict:
    device = settings.device
    cases = shapes(device, settings.quick)
    peaks = peak_memory([(peer, precision, *shape) for shape in cases for precision in settings.precisions
                         for peer in PEERS], device)
    rows = []
    for tokens, dim, vocab in cases:
        for precision in settings.precisions:
            check_equal(tokens, dim, vocab, device, precision)
            builds = {peer: (build_loss_step, (peer, precision, tokens, dim, vocab, device)) for peer in PEERS}
            with peer_processes(builds, device) as workers:
                timings = time_samplers({peer: w.sample for peer, w in workers.items()}, settings.rounds,
                                        settings.min_sample_s)
            row = {"tokens": tokens, "d_model": dim, "vocab": vocab, "precision": precision,
                   "logits_bytes": 4 * tokens * vocab}
            for peer in PEERS:
                row[peer] = {**timings[peer].as_dict(), "peak_bytes": peaks[(peer, precision, tokens, dim, vocab)],
                             "tokens_per_s": tokens / timings[peer].median}
            row["fused_speedup"] = speedup(timings, "fused", "unfused")
            row["unfused_memory_over_fused"] = row["unfused"]["peak_bytes"] / max(row["fused"]["peak_bytes"], 1)
            rows.append(row)
    print_results(rows)
    return {"rows": rows, "precisions": list(settings.precisions),
            "memory_measure": "cuda max_memory_allocated" if device.type == "cuda" else "resident-set growth"}


def check_equal(tokens: int, dim: int, vocab: int, device: torch.device, precision: str) -> None:
    """The peers' losses and gradients agree, or the timing means nothing: float32 to 1e-4; bf16 to 5e-2 (its
    8-bit mantissa, with logits rounded differently in the two paths)."""
    hidden, weight, targets = inputs(tokens, dim, vocab, device)
    results = {}
    for peer in PEERS:
        loss = loss_step(peer, hidden, weight, targets, precision)()
        results[peer] = (loss.detach(), hidden.grad.clone(), weight.grad.clone())
    # Gradients of a mean over N tokens are O(1/N): compared times N, so the tolerance means something.
    tol = dict(rtol=1e-4, atol=1e-4) if precision == "float32" and device.type == "cpu" else dict(rtol=5e-2, atol=5e-2)
    for ours, theirs, scale in zip(results["fused"], results["unfused"], (1, tokens, tokens)):
        torch.testing.assert_close(ours.float() * scale, theirs.float() * scale, **tol)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def print_results(rows: list[dict]) -> None:
    table = [[f"{r['tokens']} x {r['d_model']} -> {r['vocab']}", r["precision"], r["fused"]["median_s"] * 1e3,
              r["unfused"]["median_s"] * 1e3, f"{r['fused_speedup']['wall']:.2f}x", f"{r['fused_speedup']['cpu']:.2f}x",
              r["fused"]["peak_bytes"] / 2**20, r["unfused"]["peak_bytes"] / 2**20,
              f"{r['unfused_memory_over_fused']:.1f}x"] for r in rows]
    print_table("LM head + cross-entropy, forward + backward (bf16: autocast)",
                ["tokens x d -> vocab", "precision", "fused ms", "unfused ms", "fused vs unfused", "(cpu time)", "fused MiB",
                 "unfused MiB", "memory saved"], table,
                ("unfused: logits = hidden @ W.T, then F.cross_entropy, as transformers' LlamaForCausalLM",))


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--probe":
    torch.set_num_threads(int(sys.argv[3]))
    _probe([tuple(case) for case in json.loads(sys.argv[2])])
