"""The long-context peers of longctx_bench at one length only: time in shared rounds and peak memory, each against
plain attention (sdpa). python benchmarks/longctx_at.py --length 4096 (the full section runs 256 … 8192)."""

from __future__ import annotations

import argparse
import json

import torch

import longctx_bench as lb
from common import cpu_model, speedup, time_peers

PEERS = ("sdpa", "alibi-sdpa", "fire-sdpa", "cope-explicit", *lb.METHODS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cpu")
    models = {peer: lb.build(peer, device) for peer in PEERS}
    idx, targets = lb.tokens(args.length, models["sdpa"].cfg.vocab_size, device)
    peaks = lb.peak_memory([(peer, args.length) for peer in PEERS], device)
    timings = time_peers({peer: (lambda m=models[peer]: lb.evaluate(m, idx, targets)) for peer in PEERS},
                         device, args.rounds, 0.5)
    print(f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.length} tokens")
    print("| peer | median | peak memory | time over sdpa |\n|---|---|---|---|")
    rows = {}
    for peer in PEERS:
        rows[peer] = {"median_ms": timings[peer].median * 1e3, "peak_mib": peaks[peer, args.length] / 2**20,
                      "time_over_sdpa": speedup(timings, "sdpa", peer)["wall"]}
        print(f"| {peer} | {rows[peer]['median_ms']:.0f} ms | {rows[peer]['peak_mib']:.0f} MiB | "
              f"{rows[peer]['time_over_sdpa']:.2f}x |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
