"""Training-step throughput of our Transformer against transformers.LlamaForCausalLM of the same shape.

Both models: the same parameter count (asserted), batch, sequence, tokens and targets, AdamW with the
task's parameter groups (decay on matrices only), the loss as next-token cross-entropy on precomputed
targets. A step is forward + loss + backward + optimizer step + zero_grad. CPU: float32, eager. CUDA:
bf16 autocast (as Lightning's bf16-mixed), fused AdamW, both loss functions torch.compile'd, flash SDPA,
and MFU against the data-sheet peak (minillm.task.GPU_PEAK_FLOPS). CPU reports model FLOP/s only: a
matmul peak measured on a shared machine moves with the load, so a CPU MFU would not mean much.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from common import Settings, print_table, speedup, time_peers
from minillm.config import ModelConfig
from minillm.model import Transformer
from minillm.task import parameter_groups, peak_flops_for

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


def trainer_step(model: torch.nn.Module, loss_of, x: torch.Tensor, y: torch.Tensor, device: torch.device):
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
                                  fused=device.type == "cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    def step():
        with autocast():
            loss = loss_of(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run(settings: Settings) -> dict:
    device, quick, rounds, min_sample_s = settings.device, settings.quick, settings.rounds, settings.min_sample_s
    transformers = settings.transformers
    peak_flops = peak_flops_for(device) if device.type == "cuda" else None
    results = []
    for name, cfg, batch, seq in model_settings(device, quick):
        torch.manual_seed(0)
        g = torch.Generator(device).manual_seed(0)
        x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g, device=device)
        y = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g, device=device)
        ours = Transformer(cfg).to(device)
        compile_models = device.type == "cuda" and not quick
        # The loss functions are compiled, not the modules: Module.compile() only wraps __call__, and
        # Transformer.loss never goes through it.
        maybe_compile = torch.compile if compile_models else (lambda fn: fn)
        steps = {"ours": trainer_step(ours, maybe_compile(ours.loss), x, y, device)}
        params = sum(p.numel() for p in ours.parameters())
        record = {"model": name, "batch": batch, "seq": seq, "tokens_per_step": batch * seq, "params": params,
                  "dtype": "bf16-autocast" if device.type == "cuda" else "float32", "compiled": compile_models,
                  "flops_per_token": ours.flops_per_token(seq), "peak_flops": peak_flops}
        if transformers is not None:
            hf = llama_like(transformers, cfg, device)
            hf_params = sum(p.numel() for p in hf.parameters())
            assert hf_params == params, f"parameter counts differ: ours {params}, transformers {hf_params}"

            def hf_loss(x, y, hf=hf):
                logits = hf(input_ids=x).logits
                return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

            steps["transformers"] = trainer_step(hf, maybe_compile(hf_loss), x, y, device)
        timings = time_peers(steps, device, rounds, min_sample_s)
        for peer, timing in timings.items():
            tokens_per_s = batch * seq / timing.median
            flops_per_s = tokens_per_s * record["flops_per_token"]
            record[peer] = {**timing.as_dict(), "tokens_per_s": tokens_per_s, "model_flops_per_s": flops_per_s,
                            "mfu": flops_per_s / peak_flops if peak_flops else None}
        record["speedup_vs_transformers"] = speedup(timings, "ours", "transformers") if transformers else None
        results.append(record)
    print_results(results)
    return {"models": results}


def print_results(results: list[dict]) -> None:
    rows = []
    for r in results:
        for peer in ("ours", "transformers"):
            if peer not in r:
                continue
            ratio = r["speedup_vs_transformers"] if peer == "ours" else None
            mfu = r[peer]["mfu"]
            rows.append([f"{r['model']}:{peer}", r["batch"], r["seq"], r["params"], r[peer]["median_s"] * 1e3,
                         r[peer]["tokens_per_s"], r[peer]["model_flops_per_s"] / 1e9, None if mfu is None else f"{mfu:.1%}",
                         None if ratio is None else f"{ratio['wall']:.2f}x",
                         None if ratio is None else f"{ratio['cpu']:.2f}x"])
    print_table("train step (forward + backward + AdamW)", ["model:peer", "batch", "seq", "params", "ms/step",
                "tokens/s", "GFLOP/s", "MFU", "vs hf", "vs hf (cpu time)"], rows,
                ("vs hf: how many times faster than transformers, median of per-round ratios; MFU on GPUs only",))
