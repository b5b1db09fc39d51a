"""Long-context evaluation: time and peak memory of Transformer.token_losses against the sequence length.

Peers, the same tiny model (random weights: time and memory do not depend on them), batch 1, inference_mode:
    sdpa        rotary (complex) model as it is: no mask, SDPA's fused causal kernel (flash on CPU and CUDA)
    naive       the same weights with NaiveAttention: an explicit (L, L) float mask, scores, softmax; up to
                NAIVE_MAX_LENGTH (quadratic: on CPU 1.4 s and 0.6 GB at 4096 tokens, 4x the memory per doubling)
    alibi-sdpa  an ALiBi model: its bias goes to SDPA through attn_mask, whole up to minillm.model.masks.MASK_BUDGET
                elements (quadratic), then by blocks of queries (model.BlockedMask)
    t5-sdpa, kerple-sdpa, fire-sdpa  the learned relative biases, through the same path (FIRE: one MLP per
                layer, its hidden activations by blocks of rows too)
    cope-explicit  CoPE: its logits depend on the scores, so attention is written out (model.contextual_attention),
                by blocks of queries; like naive, up to EXPLICIT_MAX_LENGTH
    self_extend, rerope, leaky_rerope, lm_infinite, sinks  the sdpa model read with a training-free attention
                method (minillm.positions.methods, defaults at the model's training length): two score sets, each through
                SDPA's flash kernel with its log-sum-exp, merged, each block of queries over only the keys it
                sees (model.BlockedMask); `time_over_sdpa` is each one's time over plain attention's in the same
                rounds (target ≤ 2.5x at 4096 tokens)

Against transformers (`vs_transformers`): model=small (10 × 384), Transformer.token_losses against the same
weights exported to LlamaForCausalLM (minillm.export.to_hf_llama; its losses checked equal first) read as a
user of transformers would, logits = forward(input_ids), then F.cross_entropy per token. Each precision of the run
(float32; bf16 = autocast to bfloat16, as evaluation's precision=bf16) is one more pair of peers in the same
rounds. CPU: 1024 and 4096 tokens (target ≥ 1.3x at 4096 in both precisions); CUDA: 4096 and 16384.

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
import torch.nn.functional as F

from common import (Settings, autocast, print_table, probe_in_fresh_process, resident_growth,
                    speedup, time_peers)
from minillm.positions.methods import attention_method
from minillm.model.config import ModelConfig
from minillm.model.masks import AttentionPlan
from minillm.model.transformer import Attention, KVCache, Transformer
from minillm.positions.base import position_config
from train_bench import model_config

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

    def forward(self, x: torch.Tensor, plan: AttentionPlan, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        if cache is not None:
            raise ValueError("NaiveAttention: full sequences only")
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_heads * self.head_dim, self.kv_heads * self.head_dim,
                                     self.kv_heads * self.head_dim], dim=-1)
        q = self.q_norm(q.view(batch, seq, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(batch, seq, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = v.view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        rotation, mask = plan.rotation, plan.mask
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


def evaluate(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor, precision: str = "float32") -> torch.Tensor:
    """Per-token losses (float32): ours through token_losses, transformers' model through its logits."""
    with torch.inference_mode(), autocast(idx.device, precision):
        if not isinstance(model, Transformer):  # LlamaForCausalLM
            logits = model(input_ids=idx).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets)
        return model.token_losses(idx, targets, attention=getattr(model, "benchmark_method", None))


# ----------------------------------------------------------------------------------------------
# Against transformers: model=small, the same weights, in every precision



def vs_hf_lengths(device: torch.device, quick: bool) -> list[int]:
    return [64, 128] if quick else [4096, 16384] if device.type == "cuda" else [1024, 4096]


def build_vs_hf(peer: str, device: torch.device, quick: bool) -> torch.nn.Module:
    """"ours" or "transformers": the same random weights (model=small; --quick the tiny default)."""
    from minillm.interop.export import to_hf_llama

    torch.manual_seed(0)
    model = Transformer(ModelConfig() if quick else model_config("small")).to(device).eval()
    return model if peer == "ours" else to_hf_llama(model).to(device).eval()


def compare_with_transformers(settings: Settings) -> dict:
    """Time and peak memory of our token_losses against transformers' forward + cross-entropy."""
    device, quick = settings.device, settings.quick
    models = {peer: build_vs_hf(peer, device, quick) for peer in ("ours", "transformers")}
    idx, targets = tokens(64, models["ours"].cfg.vocab_size, device)
    torch.testing.assert_close(evaluate(models["ours"], idx, targets), evaluate(models["transformers"], idx, targets),
                               rtol=1e-4, atol=1e-4)  # the same model, or the timing means nothing
    peers = [(peer, precision) for precision in settings.precisions for peer in models]
    cases = [(f"vs_hf:{peer}@{precision}", length) for length in vs_hf_lengths(device, quick) for peer, precision in peers]
    peaks = peak_memory(cases, device, quick)
    rows = []
    for length in vs_hf_lengths(device, quick):
        idx, targets = tokens(length, models["ours"].cfg.vocab_size, device)
        timings = time_peers({f"{peer}@{precision}": (lambda m=models[peer], p=precision: evaluate(m, idx, targets, p))
                              for peer, precision in peers}, device, settings.rounds, settings.min_sample_s)
        row = {"length": length}
        for name, timing in timings.items():
            row[name] = {**timing.as_dict(), "peak_bytes": peaks[f"vs_hf:{name}", length],
                         "tokens_per_s": length / timing.median}
        row["speedup_vs_transformers"] = {precision: speedup(timings, f"ours@{precision}", f"transformers@{precision}")
                                          for precision in settings.precisions}
        if len(settings.precisions) == 2:
            row["bf16_over_float32"] = {peer: speedup(timings, f"{peer}@bf16", f"{peer}@float32") for peer in models}
        rows.append(row)
    names = [f"{peer}@{precision}" for peer, precision in peers]
    first, last = rows[0], rows[-1]
    exponents = {name: math.log(max(last[name]["peak_bytes"], 1) / max(first[name]["peak_bytes"], 1))
                 / math.log(last["length"] / first["length"]) for name in names}
    table = [[r["length"], *(r[n]["median_s"] * 1e3 for n in names), *(r[n]["peak_bytes"] / 2**20 for n in names),
              *(f"{r['speedup_vs_transformers'][p]['wall']:.2f}x" for p in settings.precisions)] for r in rows]
    print_table(f"long-context evaluation against transformers (model {'tiny' if quick else 'small'}, batch 1; "
                "ours: token_losses; transformers: forward, then cross-entropy)",
                ["length", *(f"{n} ms" for n in names), *(f"{n} MiB" for n in names),
                 *(f"vs hf {p}" for p in settings.precisions)], table,
                ("memory growth exponents between the shortest and the longest length (1 linear, 2 quadratic): "
                 + ", ".join(f"{n} {e:.2f}" for n, e in exponents.items()),
                 *([("bf16 over float32, same rounds: " + "; ".join(
                     f"{r['length']}: " + ", ".join(f"{peer} {g['wall']:.2f}x" for peer, g in r['bf16_over_float32'].items())
                     for r in rows))] if len(settings.precisions) == 2 else [])))
    return {"model": "tiny" if quick else "small", "rows": rows, "memory_exponent": exponents}


def build_case(peer: str, device: torch.device, quick: bool) -> tuple[torch.nn.Module, str]:
    """(model, precision) of a memory case: "vs_hf:<peer>@<precision>" or one of PEERS (float32)."""
    if peer.startswith("vs_hf:"):
        name, _, precision = peer.removeprefix("vs_hf:").partition("@")
        return build_vs_hf(name, device, quick), precision
    return build(peer, device), "float32"


def vocab_of(model: torch.nn.Module) -> int:
    """The vocabulary of our Transformer or of a transformers model."""
    return model.cfg.vocab_size if isinstance(model, Transformer) else model.config.vocab_size


def peak_memory(cases: list[tuple[str, int]], device: torch.device, quick: bool = False) -> dict[tuple[str, int], int]:
    """Bytes per (peer, length): the growth of memory in use during one evaluation."""
    if device.type == "cpu":  # one fresh process measures every case (see the module docstring)
        return {(peer, length): peak for peer, length, peak in probe_in_fresh_process(__file__, cases, quick)}
    peaks = {}
    for peer, length in cases:
        model, precision = build_case(peer, device, quick)
        idx, targets = tokens(length, vocab_of(model), device)
        evaluate(model, idx, targets, precision)  # warm-up: kernels, rotary tables
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        evaluate(model, idx, targets, precision)
        peaks[peer, length] = torch.cuda.max_memory_allocated(device) - before
        del model
    return peaks


def _probe(cases: list[tuple[str, int]], quick: bool) -> None:
    """In a fresh CPU process: resident-set growth of each evaluation, printed as JSON."""
    cpu = torch.device("cpu")
    models = {peer: build_case(peer, cpu, quick) for peer in {peer for peer, _ in cases}}
    peaks = []
    for peer, length in cases:
        model, precision = models[peer]
        idx, targets = tokens(length, vocab_of(model), cpu)
        peaks.append((peer, length, resident_growth(lambda: evaluate(model, idx, targets, precision))))
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
    result = {"model": "tiny", "batch": 1, "precision": "float32", "rows": rows, "memory_exponent": exponents,
              "memory_measure": "cuda max_memory_allocated" if device.type == "cuda" else "resident-set growth"}
    if settings.transformers is not None:
        result["vs_transformers"] = compare_with_transformers(settings)
    return result


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


if __name__ == "__main__" and len(sys.argv) in (4, 5) and sys.argv[1] == "--probe":
    torch.set_num_threads(int(sys.argv[3]))
    _probe([tuple(case) for case in json.loads(sys.argv[2])], quick=sys.argv[4:] == ["--quick"])
