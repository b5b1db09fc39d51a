"""Long-context evaluation: time and peak memory of Transformer.token_losses against the sequence length.

Peers, the same tiny model (random weights: time and memory do not depend on them), batch 1, inference_mode:
    sdpa        rotary (complex) model as it is: no mask, SDPA's fused causal kernel (flash on CPU and CUDA)
    naive       the same weights with NaiveAttention: an explicit (L, L) float mask, scores, softmax; up to
                NAIVE_MAX_LENGTH (quadratic: on CPU 1.4 s and 0.6 GB at 4096 tokens, 4x the memory per doubling)
    alibi-sdpa  an ALiBi model: its bias goes to SDPA through attn_mask, whole up to minillm.model.MASK_BUDGET
                elements (quadratic), then by blocks of queries (model.BlockedMask)
    t5-sdpa, kerple-sdpa, fire-sdpa  the learned relative biases, through the same path (FIRE: one MLP per
                layer, its hidden activations by blocks of rows too)
    cope-explicit  CoPE: its logits depend on the scores, so attention is written out (model.contextual_attention),
                by blocks of queries; like naive, up to EXPLICIT_MAX_LENGTH
    self_extend, rerope, leaky_rerope, lm_infinite, sinks  the sdpa model read with a training-free attention
                method (minillm.attention, defaults at the model's training length): two score sets, each through
                SDPA's flash kernel with its log-sum-exp, merged, each block of queries over only the keys it
                sees (model.BlockedMask); `time_over_sdpa` is each one's time over plain attention's in the same
                rounds (target ≤ 2.5x at 4096 tokens)

Peak memory. CUDA: torch.cuda.max_memory_allocated during the call, minus what was allocated before it.
CPU: torch keeps no allocation statistics there, so each (peer, length) runs in a fresh subprocess that
reads its resident set before the call and its high-water mark after it (reset just before the call
through /proc/self/clear_refs), with glibc's mmap threshold pinned at 64 KiB so that freed tensors leave
the resident set at once: the figure is the growth of resident memory during the call, allocator
overhead included. `memory_exponent` is the slope of log(peak) against log(length) over each peer's two
longest lengths: 1 is linear, 2 quadratic.
"""

from __future__ import annotations

import json
import math
import sys

import torch

from common import Settings, print_table, probe_in_fresh_process, resident_growth, speedup, time_peers
from minillm.attention import attention_method
from minillm.config import ModelConfig
from minillm.model import Attention, KVCache, Transformer
from minillm.rope import Rotation, position_config

BIASES = ("alibi", "t5", "kerple", "fire")  # encodings whose bias reaches SDPA as attn_mask
METHODS = ("self_extend", "rerope", "leaky_rerope", "lm_infinite", "sinks")  # on the sdpa peer's model
PEERS = ("sdpa", "naive", *(f"{name}-sdpa" for name in BIASES), "cope-explicit", *METHODS)
NAIVE_MAX_LENGTH = {"cpu": 4096, "cuda": 16384}
# Quadratic work beyond SDPA's kernels (FIRE's MLP over every (query, key) pair, CoPE's explicit attention):
# each doubling costs 4x, so CPU runs stop at the 4096 tokens the comparison needs.
EXPLICIT_MAX_LENGTH = {"cpu": 4096, "cuda": 16384}
QUADRATIC = ("naive", "fire-sdpa", "cope-explicit")


class NaiveAttention(Attention):
    """Attention.forward with the SDPA call replaced by the textbook computation (no KV cache)."""

    def forward(self, x: torch.Tensor, rotation: Rotation | None, mask, cache: KVCache | None = None,
                layer: int = 0, query_positions: torch.Tensor | None = None, context=None, parts=None) -> torch.Tensor:
        if cache is not None:
            raise ValueError("NaiveAttention: full sequences only")
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_heads * self.head_dim, self.kv_heads * self.head_dim,
                                     self.kv_heads * self.head_dim], dim=-1)
        q = self.q_norm(q.view(batch, seq, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(batch, seq, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = v.view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        if rotation is not None:
            q, k = rotation(q, k)
        if self.kv_heads != self.n_heads:
            k, v = (t.repeat_interleave(self.n_heads // self.kv_heads, dim=1) for t in (k, v))
        float_mask = torch.zeros(seq, seq, dtype=q.dtype, device=q.device)
        float_mask.masked_fill_(torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        if mask is not None:  # an additive bias (ALiBi), causal mask already folded in
            float_mask = float_mask + mask
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + float_mask
        y = scores.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))


def build(peer: str, device: torch.device) -> Transformer:
    torch.manual_seed(0)
    encoding = peer.removesuffix("-sdpa").removesuffix("-explicit")
    cfg = ModelConfig(rope=position_config(encoding)) if encoding in (*BIASES, "cope") else ModelConfig()
    model = Transformer(cfg).to(device).eval()
    if peer in METHODS:  # what evaluate() reads the model with
        model.benchmark_method = attention_method(peer)
    if peer == "naive":
        for block in model.blocks:
            block.attn.__class__ = NaiveAttention
    return model


def lengths(device: torch.device, quick: bool) -> list[int]:
    if quick:
        return [64, 128]
    top = 16384 if device.type == "cuda" else 8192
    return [2**i for i in range(8, int(math.log2(top)) + 1)]


def peers_at(length: int, device: torch.device, quick: bool) -> list[str]:
    limit = {"naive": NAIVE_MAX_LENGTH[device.type], **{p: EXPLICIT_MAX_LENGTH[device.type] for p in QUADRATIC[1:]}}
    return [peer for peer in PEERS if quick or length <= limit.get(peer, length)]


def tokens(length: int, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device).manual_seed(length)
    ids = torch.randint(0, vocab, (1, length + 1), generator=g, device=device)
    return ids[:, :-1], ids[:, 1:]


def evaluate(model: Transformer, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.token_losses(idx, targets, attention=getattr(model, "benchmark_method", None))


def peak_memory(cases: list[tuple[str, int]], device: torch.device) -> dict[tuple[str, int], int]:
    """Bytes per (peer, length): the growth of memory in use during one evaluation."""
    if device.type == "cpu":  # one fresh process measures every case (see the module docstring)
        return {(peer, length): peak for peer, length, peak in probe_in_fresh_process(__file__, cases)}
    peaks = {}
    for peer, length in cases:
        model = build(peer, device)
        idx, targets = tokens(length, model.cfg.vocab_size, device)
        evaluate(model, idx, targets)  # warm-up: kernels, rotary tables
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        evaluate(model, idx, targets)
        peaks[peer, length] = torch.cuda.max_memory_allocated(device) - before
        del model
    return peaks


def _probe(cases: list[tuple[str, int]]) -> None:
    """In a fresh CPU process: resident-set growth of each evaluation, printed as JSON."""
    models = {peer: build(peer, torch.device("cpu")) for peer in {peer for peer, _ in cases}}
    peaks = []
    for peer, length in cases:
        idx, targets = tokens(length, models[peer].cfg.vocab_size, torch.device("cpu"))
        peaks.append((peer, length, resident_growth(lambda: evaluate(models[peer], idx, targets))))
    print(json.dumps(peaks))


def run(settings: Settings) -> dict:
    device, quick, rounds, min_sample_s = settings.device, settings.quick, settings.rounds, settings.min_sample_s
    models = {peer: build(peer, device) for peer in PEERS}
    reference_idx, reference_targets = tokens(64, models["sdpa"].cfg.vocab_size, device)
    torch.testing.assert_close(evaluate(models["naive"], reference_idx, reference_targets),  # same model, same losses
                               evaluate(models["sdpa"], reference_idx, reference_targets), rtol=1e-4, atol=1e-4)
    rows = []
    peaks = peak_memory([(peer, n) for n in lengths(device, quick) for peer in peers_at(n, device, quick)], device)
    for length in lengths(device, quick):
        idx, targets = tokens(length, models["sdpa"].cfg.vocab_size, device)
        timings = time_peers({peer: (lambda m=models[peer]: evaluate(m, idx, targets))
                              for peer in peers_at(length, device, quick)}, device, rounds, min_sample_s)
        row = {"length": length}
        for peer, timing in timings.items():
            row[peer] = {**timing.as_dict(), "peak_bytes": peaks[peer, length], "tokens_per_s": length / timing.median}
        row["time_over_sdpa"] = {peer: speedup(timings, "sdpa", peer)["wall"] for peer in METHODS if peer in timings}
        if "naive" in row:
            row["sdpa_speedup_vs_naive"] = speedup(timings, "sdpa", "naive")
            row["naive_memory_over_sdpa"] = row["naive"]["peak_bytes"] / max(row["sdpa"]["peak_bytes"], 1)
        rows.append(row)
    exponents = {}
    for peer in PEERS:
        before, last = [r for r in rows if peer in r][-2:]
        exponents[peer] = (math.log(max(last[peer]["peak_bytes"], 1) / max(before[peer]["peak_bytes"], 1))
                           / math.log(last["length"] / before["length"]))
    print_results(rows, exponents)
    return {"model": "tiny", "batch": 1, "rows": rows, "memory_exponent": exponents,
            "memory_measure": "cuda max_memory_allocated" if device.type == "cuda" else "resident-set growth"}


def print_results(rows: list[dict], exponents: dict) -> None:
    def cell(row: dict, peer: str, key: str, scale: float):
        return row[peer][key] * scale if peer in row else None

    table = [[r["length"], *(cell(r, p, "median_s", 1e3) for p in PEERS), *(cell(r, p, "peak_bytes", 2**-20) for p in PEERS),
              f"{r['sdpa_speedup_vs_naive']['wall']:.2f}x" if "naive" in r else None,
              f"{r['naive_memory_over_sdpa']:.1f}x" if "naive" in r else None] for r in rows]
    print_table("long-context evaluation (token_losses, batch 1, tiny model)",
                ["length", *(f"{p} ms" for p in PEERS), *(f"{p} MiB" for p in PEERS), "sdpa vs naive",
                 "naive/sdpa mem"], table,
                ("memory growth exponents over each peer's two longest lengths (1 linear, 2 quadratic): "
                 + ", ".join(f"{p} {e:.2f}" for p, e in exponents.items()),
                 "attention methods' time over plain attention's (same rounds): "
                 + "; ".join(f"{r['length']}: " + ", ".join(f"{p} {t:.2f}x" for p, t in r["time_over_sdpa"].items())
                             for r in rows)))


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--probe":
    torch.set_num_threads(int(sys.argv[3]))
    _probe([tuple(case) for case in json.loads(sys.argv[2])])
