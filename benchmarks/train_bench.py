"""Training-step throughput of our Transformer against transformers.LlamaForCausalLM of the same shape.

Both models: the same parameter count (asserted), batch, sequence, tokens and targets, AdamW as the task
builds it (fused, decay on matrices only), the loss as next-token cross-entropy on precomputed
targets. A step is forward + loss + backward + optimizer step + zero_grad.

Every precision of the run (Settings.precisions: float32, and bf16 = torch.autocast to bfloat16 with float32
master weights, as Lightning's bf16-mixed) is one more pair of peers in the same interleaved rounds, so that
ours in bf16 over ours in float32 (`bf16_over_float32`) is a ratio of one run too. Eager first, then our
encodings against one another in rounds of their own, in the first precision only (ENCODINGS: the three rotary
layouts, p-RoPE, ALiBi, T5, KERPLE, FIRE and CoPE; the layout target is about a whole step; the learned biases
run on SDPA's default kernel, as CPU flash attention has no backward into a learned bias, and CoPE writes its
attention out). Then both compiled: our blocks through Transformer.compile_blocks (what trainer.compile does),
transformers' whole loss function through torch.compile. MFU: model FLOP/s over the peak of the precision in
use, on CPU a matmul measured just before the rounds (minillm.train.task.measure_peak_flops: the best of several
short timings, so the load of a shared machine lowers it less than the steps), on CUDA the data sheet's
(minillm.train.task.GPU_PEAK_FLOPS). Our steps run with SDPA held to its flash backend on both devices, so a change
that kept attention off the flash kernels (a dtype or shape they lack; on CUDA, any explicit mask) fails here
instead of being timed on a slower one; transformers' steps keep its own dispatch.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import Settings, autocast, optional_transformers, peer_processes, print_table, speedup, time_samplers
from minillm.model.config import ModelConfig
from minillm.model.transformer import Transformer
from minillm.train.task import GPU_PEAK_FLOPS, measure_peak_flops, parameter_groups, peak_flops_for

MODEL_CONF = Path(__file__).resolve().parent.parent / "conf" / "model"


def model_config(name: str) -> ModelConfig:
    """The conf/model preset, read from its YAML (the single source of the presets' values)."""
    return ModelConfig(**(OmegaConf.to_container(OmegaConf.load(MODEL_CONF / f"{name}.yaml")) or {}))


def model_settings(device: torch.device, quick: bool) -> list[tuple[str, ModelConfig, int, int]]:
    """(preset, config, batch, seq) per measured model."""
    if quick:
        return [("tiny", ModelConfig(context_length=32), 2, 32)]
    if device.type == "cuda":
        return [(name, model_config(name), batch, model_config(name).context_length)
                for name, batch in (("tiny", 64), ("small", 32), ("base", 16))]
    # CPU: the default training batch for tiny; small at its 512 tokens is ~1 s per step per sequence.
    return [("tiny", model_config("tiny"), 16, 256), ("small", model_config("small"), 4, 512)]


def llama_like(transformers, cfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.context_length, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope.theta,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, use_cache=False)
    config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(config).to(device)


def trainer_step(model: torch.nn.Module, loss_of, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                 precision: str):
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
                                  fused=True)  # as LanguageModelTask builds it

    def step():
        with autocast(device, precision):
            loss = loss_of(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


ENCODINGS = ("complex", "interleaved", "rotate_half", "p_rope", "alibi", "t5", "kerple", "fire", "cope")  # vs complex
LAYOUTS = ENCODINGS[:3]


def with_encoding(cfg: ModelConfig, name: str) -> ModelConfig:
    return ModelConfig.from_dict({**cfg.to_dict(), "rope": {"variant": name}})


def learned_bias(model: Transformer) -> bool:
    """A bias with parameters: SDPA's CPU flash kernel has no backward into attn_mask, so such a step runs on
    SDPA's own choice of kernel (the math path), not held to flash."""
    return not model.cfg.rope.is_rotary and any(True for _ in model.position.parameters())


def split_peer(peer: str) -> tuple[str, str]:
    """"ours@bf16" -> ("ours", "bf16"); a name without "@" is float32."""
    name, _, precision = peer.partition("@")
    return name, precision or "float32"


def build_step(peer: str, cfg: ModelConfig, batch: int, seq: int, device: torch.device, compiled: bool):
    """In the peer's own process: its model, the shared tokens and targets, and one training step.

    peer: "transformers", "ours" (complex RoPE) or "ours:<encoding>", with "@bf16" or "@float32" after it for the
    precision (float32 without). Returns (step, info)."""
    peer, precision = split_peer(peer)
    torch.manual_seed(0)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g, device=device)
    y = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g, device=device)
    if peer == "transformers":
        hf = llama_like(optional_transformers(), cfg, device)

        def hf_loss(x, y):
            logits = hf(input_ids=x).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

        step = trainer_step(hf, torch.compile(hf_loss) if compiled else hf_loss, x, y, device, precision)
        return step, {"params": sum(p.numel() for p in hf.parameters())}
    model = Transformer(with_encoding(cfg, peer.partition(":")[2] or "complex")).to(device)
    if compiled:
        model.compile_blocks()
    held = contextlib.nullcontext if learned_bias(model) else lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)

    def loss(x, y):
        with held():
            return model.loss(x, y)

    return trainer_step(model, loss, x, y, device, precision), {"params": sum(p.numel() for p in model.parameters()),
                                                     "flops_per_token": model.flops_per_token(seq),
                                                     "sdpa": "default" if learned_bias(model) else "flash (enforced)"}


def time_group(peers: list[str], cfg: ModelConfig, batch: int, seq: int, settings: Settings, compiled: bool,
               split: bool) -> tuple[dict, dict, dict]:
    """Timings, infos and (CPU, split=True) time splits of peers, each in a process of its own."""
    builds = {peer: (build_step, (peer, cfg, batch, seq, settings.device, compiled)) for peer in peers}
    with peer_processes(builds, settings.device) as workers:
        timings = time_samplers({peer: w.sample for peer, w in workers.items()}, settings.rounds,
                                settings.min_sample_s)
        splits = {peer: w.apply(time_split) for peer, w in workers.items()} if split else {}
        return timings, {peer: w.info for peer, w in workers.items()}, splits


def peak_of(device: torch.device, precision: str) -> tuple[float, str]:
    """(the matmul peak MFU is measured against, where it comes from): a known GPU's data sheet in bf16, else a
    matmul in this precision's dtype timed now."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if device.type == "cuda" and precision == "bf16" and any(key in torch.cuda.get_device_name(device)
                                                             for key in GPU_PEAK_FLOPS):
        return peak_flops_for(device, dtype), "data sheet"
    return measure_peak_flops(device, dtype), "measured matmul"


def measure(name: str, cfg: ModelConfig, batch: int, seq: int, settings: Settings, compiled: bool) -> list[dict]:
    """Ours (complex RoPE) against transformers in every precision, all timed in the same rounds; in eager runs,
    then our encodings in rounds of theirs (first precision). One record per precision. Every peer runs in a
    process of its own (common.PeerProcess)."""
    device = settings.device
    kinds = ["ours"] + (["transformers"] if settings.transformers is not None else [])
    peers = [f"{kind}@{precision}" for precision in settings.precisions for kind in kinds]
    peaks = {precision: peak_of(device, precision) for precision in settings.precisions}
    timings, infos, splits = time_group(peers, cfg, batch, seq, settings, compiled, split=device.type == "cpu")
    records = []
    for precision in settings.precisions:
        ours, theirs = f"ours@{precision}", f"transformers@{precision}"
        if theirs in infos:
            assert infos[theirs]["params"] == infos[ours]["params"], \
                f"parameter counts differ: ours {infos[ours]['params']}, transformers {infos[theirs]['params']}"
        record = {"model": name, "batch": batch, "seq": seq, "tokens_per_step": batch * seq,
                  "params": infos[ours]["params"], "precision": precision,
                  "dtype": "bf16-autocast" if precision == "bf16" else "float32",
                  "compiled": compiled, "sdpa_backend_ours": "flash (enforced)",
                  "flops_per_token": infos[ours]["flops_per_token"], "peak_flops": peaks[precision][0],
                  "peak_flops_source": peaks[precision][1]}

        def add(timings: dict, named: dict) -> None:
            for key, peer in named.items():
                tokens_per_s = batch * seq / timings[peer].median
                flops_per_s = tokens_per_s * record["flops_per_token"]
                record[key] = {**timings[peer].as_dict(), "tokens_per_s": tokens_per_s,
                               "model_flops_per_s": flops_per_s, "mfu": flops_per_s / record["peak_flops"]}
                if peer in splits:
                    record[key]["time_split"] = splits[peer]

        add(timings, {kind: f"{kind}@{precision}" for kind in kinds})
        record["speedup_vs_transformers"] = speedup(timings, ours, theirs) if theirs in timings else None
        if precision == "bf16" and "ours@float32" in timings:  # how many times faster bf16 ran than float32
            record["bf16_over_float32"] = {kind: speedup(timings, f"{kind}@bf16", f"{kind}@float32")
                                           for kind in kinds}
        if not compiled and not settings.quick and precision == settings.precisions[0]:
            encodings = {f"ours:{e}": f"ours:{e}@{precision}" for e in ENCODINGS}
            enc_timings, enc_infos, _ = time_group(list(encodings.values()), cfg, batch, seq, settings, compiled,
                                                   split=False)
            add(enc_timings, encodings)
            for key, peer in encodings.items():
                record[key]["sdpa"] = enc_infos[peer]["sdpa"]
            medians = [enc_timings[encodings[f"ours:{e}"]].median for e in LAYOUTS]
            record["layout_spread"] = max(medians) / min(medians)  # slowest layout's step over the fastest's
            # each encoding's step over complex RoPE's, median of the per-round ratios (>1: slower)
            record["cost_vs_complex"] = {e: speedup(enc_timings, encodings["ours:complex"], encodings[f"ours:{e}"])["wall"]
                                         for e in ENCODINGS}
        records.append(record)
    return records


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}


@contextlib.contextmanager
def quiet_stderr():
    """File descriptor 2 to /dev/null: the profiler's C++ side logs two lines per session there."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def time_split(step, steps: int = 2) -> dict:
    """Seconds per step in matrix multiplications, in attention (SDPA, forward and backward) and in
    everything else, from torch.profiler's self time of each op (CPU only; the profiler adds a few
    microseconds to every op, which lands in "other")."""
    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
    per_step = 1e6 * steps  # the profiler counts microseconds
    return {"matmul_s": matmul / per_step, "attention_s": attention / per_step,
            "other_s": (total - matmul - attention) / per_step}


def run(settings: Settings) -> dict:
    device, quick = settings.device, settings.quick
    # CUDA is measured compiled (the GPU target); CPU eager and compiled; --quick eager only.
    modes = [True] if device.type == "cuda" and not quick else [False] if quick else [False, True]
    results = [record for compiled in modes for name, cfg, batch, seq in model_settings(device, quick)
               for record in measure(name, cfg, batch, seq, settings, compiled)]
    print_results(results)
    return {"models": results}


def print_results(results: list[dict]) -> None:
    rows = []
    for r in results:
        peers = [p for p in ("ours", "transformers", *(f"ours:{name}" for name in ENCODINGS)) if p in r]
        for peer in peers:
            ratio = r["speedup_vs_transformers"] if peer == "ours" else None
            mfu = r[peer]["mfu"]
            label = f"{_label(r)}:{peer.replace('ours:', 'ours ')}"
            bf16_gain = r.get("bf16_over_float32", {}).get(peer)
            rows.append([label, r["batch"], r["seq"], r["params"], r[peer]["median_s"] * 1e3,
                         r[peer]["tokens_per_s"], r[peer]["model_flops_per_s"] / 1e9, None if mfu is None else f"{mfu:.1%}",
                         None if ratio is None else f"{ratio['wall']:.2f}x",
                         None if ratio is None else f"{ratio['cpu']:.2f}x",
                         None if bf16_gain is None else f"{bf16_gain['wall']:.2f}x"])
    split_rows = []
    for r in results:
        if "time_split" in r.get("ours", {}) and "time_split" in r.get("transformers", {}):
            # Their timed step (the profiler's own overhead inflates its totals) over our profiled matmul + attention.
            ours = r["ours"]["time_split"]
            r["speedup_ceiling"] = r["transformers"]["median_s"] / (ours["matmul_s"] + ours["attention_s"])
        for peer in ("ours", "transformers"):
            split = r.get(peer, {}).get("time_split")
            if split:
                ceiling = r.get("speedup_ceiling") if peer == "ours" else None
                split_rows.append([f"{_label(r)}:{peer}",
                                   split["matmul_s"] * 1e3, split["attention_s"] * 1e3, split["other_s"] * 1e3,
                                   f"{(split['matmul_s'] + split['attention_s']) / sum(split.values()):.0%}",
                                   None if ceiling is None else f"{ceiling:.2f}x"])
    peaks = "; ".join(f"{precision} {min(p) / 1e9:,.0f}–{max(p) / 1e9:,.0f} GFLOP/s" for precision, p in
                      ((precision, [r["peak_flops"] for r in results if r["precision"] == precision])
                       for precision in dict.fromkeys(r["precision"] for r in results)))
    sources = ", ".join(sorted({r["peak_flops_source"] for r in results}))
    spreads = ", ".join(f"{r['model']} {r['layout_spread']:.2f}x" for r in results if "layout_spread" in r)
    costs = "; ".join(f"{r['model']}: " + ", ".join(f"{name} {cost:.2f}x" for name, cost in r["cost_vs_complex"].items()
                                                     if name != "complex") for r in results if "cost_vs_complex" in r)
    print_table("train step (forward + backward + AdamW)", ["model:peer", "batch", "seq", "params", "ms/step",
                "tokens/s", "GFLOP/s", "MFU", "vs hf", "vs hf (cpu time)", "bf16 vs fp32"], rows,
                ("vs hf: how many times faster than transformers in the same precision, median of per-round ratios; "
                 "bf16 vs fp32: the same peer's bf16 step over its float32 step (same rounds)",
                 f"MFU: model FLOP/s over the matmul peak of the precision ({sources}, before each model's rounds): {peaks}",
                 "ours = complex RoPE" + (f"; slowest layout over fastest (same rounds): {spreads}" if spreads else ""),
                 *([f"step time over complex RoPE's (same rounds; learned biases on SDPA's default kernel, cope explicit): {costs}"]
                   if costs else [])))
    if split_rows:
        print_table("where a train step's time goes (torch.profiler, ms per step)",
                    ["model:peer", "matmul", "attention", "other", "matmul+attention", "ceiling"], split_rows,
                    ("ceiling: transformers' timed step over our matmul + attention, the speedup if everything "
                     "else took no time; the profiler's per-op overhead inflates 'other'",))


def _label(record: dict) -> str:
    return f"{record['model']} {record['precision']}{' compiled' if record['compiled'] else ''}"
