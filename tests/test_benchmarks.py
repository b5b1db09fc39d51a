"""The benchmark suite runs end to end (toy sizes, no timing asserted); blocks compile without graph breaks."""

from __future__ import annotations

import json
import operator
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillm.model.config import ModelConfig
from minillm.positions.base import Positions, position_config
from minillm.positions.rotary import RotaryConfig
from minillm.model.masks import AttentionPlan
from minillm.model.transformer import Transformer

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "run.py"


def run_suite(tmp_path: Path, *args: str, env: dict | None = None) -> tuple[dict, str]:
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, str(SUITE), "--quick", "--threads", "1", "--out", str(out), *args],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


@pytest.mark.slow
def test_quick_suite_reports_every_section_with_its_ratios(tmp_path):
    pytest.importorskip("transformers")
    results, stdout = run_suite(tmp_path, "--precision", "both")  # bf16 runs (emulated) where it is not native
    env = results["environment"]
    for key in ("torch", "transformers", "device", "cpu_model", "torch_threads", "load_average", "native_bf16_cpu"):
        assert key in env
    assert env["torch_threads"] == 1 and results["transformers_peers"] is True
    assert results["precisions"] == ["float32", "bf16"]

    (case,) = results["rope"]["cases"]
    assert set(case["modes"]) == {"forward", "forward_backward"}
    for mode in case["modes"].values():
        ours = {name for name in mode["peers"] if name.startswith("ours:")}
        assert len(ours) == 6  # three layouts, each with and without XPos
        assert {"transformers", "transformers-apply", "copy"} <= set(mode["peers"])
        for name in ours:
            assert mode["peers"][name]["bytes_per_s"] > 0
            for ratio in ("vs_reference", "vs_transformers", "vs_transformers_apply", "fraction_of_copy"):
                assert mode["ratios"][name][ratio]["wall"] > 0 and mode["ratios"][name][ratio]["cpu"] > 0
        assert mode["layout_spread"] >= 1.0

    loss_cases = results["loss"]["rows"]
    assert [case["precision"] for case in loss_cases] == ["float32", "bf16"]
    for loss_case in loss_cases:
        assert (loss_case["tokens"], loss_case["vocab"]) == (64, 128)
        for peer in ("fused", "unfused"):
            assert loss_case[peer]["median_s"] > 0 and loss_case[peer]["peak_bytes"] >= 0
        assert loss_case["fused_speedup"]["wall"] > 0 and loss_case["logits_bytes"] == 4 * 64 * 128

    (norm_case,) = results["norm"]["rows"]
    assert (norm_case["tokens"], norm_case["dim"]) == (64, 32)
    assert set(norm_case["speedup"]) == {"formula", "torch", "transformers"}
    assert all(ratio["wall"] > 0 for ratio in norm_case["speedup"].values()) and norm_case["ours"]["median_s"] > 0

    models = results["train"]["models"]
    assert [model["precision"] for model in models] == ["float32", "bf16"]
    for model in models:
        assert model["ours"]["tokens_per_s"] > 0 and model["transformers"]["tokens_per_s"] > 0
        assert model["speedup_vs_transformers"]["wall"] > 0 and model["ours"]["model_flops_per_s"] > 0
        assert model["compiled"] is False  # --quick measures eager steps only
        # MFU against the measured matmul peak of the model's own precision
        assert model["peak_flops_source"] == "measured matmul" and model["peak_flops"] > 0
        assert model["ours"]["mfu"] == pytest.approx(model["ours"]["model_flops_per_s"] / model["peak_flops"])
        for peer in ("ours", "transformers"):
            split = model[peer]["time_split"]
            assert split["matmul_s"] > 0 and split["attention_s"] > 0 and split["other_s"] > 0
        ours = model["ours"]["time_split"]
        expected_ceiling = model["transformers"]["median_s"] / (ours["matmul_s"] + ours["attention_s"])
        assert model["speedup_ceiling"] == pytest.approx(expected_ceiling)
    assert set(models[1]["bf16_over_float32"]) == {"ours", "transformers"} and "bf16_over_float32" not in models[0]
    bf16_gain = models[1]["bf16_over_float32"]["ours"]["wall"]
    # the same rounds: the per-round ratio's median lies within the spread of the two peers' own timings
    assert min(models[0]["ours"]["rounds_s"]) / max(models[1]["ours"]["rounds_s"]) <= bf16_gain \
        <= max(models[0]["ours"]["rounds_s"]) / min(models[1]["ours"]["rounds_s"])

    rows = results["longctx"]["rows"]
    assert [row["length"] for row in rows] == [64, 128]
    for row in rows:
        for peer in ("sdpa", "naive", "alibi-sdpa", "t5-sdpa", "kerple-sdpa", "fire-sdpa", "cope-explicit",
                     "self_extend", "rerope", "leaky_rerope", "lm_infinite", "sinks"):
            assert row[peer]["median_s"] > 0 and row[peer]["peak_bytes"] > 0
        assert row["sdpa_speedup_vs_naive"]["wall"] > 0 and row["naive_memory_over_sdpa"] > 0
        assert set(row["time_over_sdpa"]) == {"self_extend", "rerope", "leaky_rerope", "lm_infinite", "sinks"}
        assert all(ratio > 0 for ratio in row["time_over_sdpa"].values())
    assert set(results["longctx"]["memory_exponent"]) == {"sdpa", "naive", "alibi-sdpa", "t5-sdpa", "kerple-sdpa",
                                                          "fire-sdpa", "cope-explicit", "self_extend", "rerope",
                                                          "leaky_rerope", "lm_infinite", "sinks"}
    vs_hf = results["longctx"]["vs_transformers"]
    assert [row["length"] for row in vs_hf["rows"]] == [64, 128]
    names = {f"{peer}@{precision}" for peer in ("ours", "transformers") for precision in ("float32", "bf16")}
    for row in vs_hf["rows"]:
        assert all(row[name]["median_s"] > 0 and row[name]["peak_bytes"] > 0 for name in names)
        assert set(row["speedup_vs_transformers"]) == {"float32", "bf16"}
        assert set(row["bf16_over_float32"]) == {"ours", "transformers"}
    assert set(vs_hf["memory_exponent"]) == names

    finetune = results["finetune"]
    (record,) = finetune["records"]  # --quick: a tiny imported Llama, the first precision only
    assert finetune["model"] == "tiny random Llama" and (record["precision"], record["window"]) == ("float32", 32)
    assert record["speedup_vs_transformers"]["wall"] > 0 and record["speedup_vs_transformers"]["cpu"] > 0
    for peer in ("ours", "transformers"):
        assert record[peer]["tokens_per_s"] == pytest.approx(32 / record[peer]["median_s"])
        assert 0 < record[peer]["step_peak_rss"] <= record[peer]["lifetime_peak_rss"]

    for title in ("rope forward:", "rope forward_backward:", "LM head + cross-entropy", "RMSNorm, forward + backward",
                  "train step", "where a train step's time goes", "tiny bf16:ours",
                  "long-context evaluation", "long-context evaluation against transformers",
                  "fine-tuning step of an imported model", "tiny random Llama float32:ours"):
        assert title in stdout


@pytest.mark.slow
def test_suite_without_the_transformers_peers_says_so(tmp_path):
    results, stdout = run_suite(tmp_path, "--only", "rope,norm,train", "--skip-transformers", "--precision", "float32")
    assert "its peers are skipped" in stdout
    assert results["transformers_peers"] is False and "longctx" not in results
    mode = results["rope"]["cases"][0]["modes"]["forward_backward"]
    assert "transformers" not in mode["peers"] and "vs_transformers" not in mode["ratios"]["ours:complex"]
    assert set(results["norm"]["rows"][0]["speedup"]) == {"formula", "torch"}
    assert results["precisions"] == ["float32"]  # --precision float32
    (model,) = results["train"]["models"]
    assert "transformers" not in model and model["speedup_vs_transformers"] is None
    assert model["ours"]["time_split"]["matmul_s"] > 0 and "speedup_ceiling" not in model


def test_unknown_section_is_refused(tmp_path):
    done = subprocess.run([sys.executable, str(SUITE), "--only", "rope,nope"], capture_output=True, text=True)
    assert done.returncode != 0 and "--only" in done.stderr
    done = subprocess.run([sys.executable, str(SUITE), "--precision", "fp8"], capture_output=True, text=True)
    assert done.returncode == 2 and "--precision" in done.stderr


def test_auto_precision_adds_bf16_where_the_processor_has_it(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import minillm.precision
    from common import precisions_for

    cpu = torch.device("cpu")
    monkeypatch.setattr(minillm.precision, "native_bf16_cpu", lambda: "AMX")
    assert precisions_for("auto", cpu) == ("float32", "bf16")
    monkeypatch.setattr(minillm.precision, "native_bf16_cpu", lambda: None)
    assert precisions_for("auto", cpu) == ("float32",)
    assert precisions_for("both", cpu) == ("float32", "bf16") and precisions_for("bf16", cpu) == ("bf16",)
    assert precisions_for("auto", torch.device("cuda")) == ("bf16",)


# ----------------------------------------------------------------------------------------------
# torch.compile: a block's forward, position encoding included, is one graph


COMPILED = {  # name: (position encoding, also compile the backward)
    "complex": (RotaryConfig("complex"), False),
    "rotate_half_xpos": (RotaryConfig("rotate_half", xpos_scale_base=16.0), True),
    "interleaved_partial": (RotaryConfig("interleaved", rotary_dim=8), False),
    "alibi": (position_config("alibi"), False),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMPILED))
def test_block_compiles_to_one_graph_and_matches_eager(name):
    torch._dynamo.reset()
    position_cfg, backward = COMPILED[name]
    model = Transformer(ModelConfig(vocab_size=64, d_model=64, n_heads=4, n_kv_heads=2, n_layers=1, rope=position_cfg))
    block = model.blocks[0]
    x = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(0), requires_grad=backward)
    positions = Positions.contiguous(0, 24, x.device)
    rotation = model.position.rotation(positions)  # built once per forward, outside the blocks, as the model does
    mask = model._mask(positions, x.dtype)  # None for the rotary models, ALiBi's bias otherwise
    # fullgraph=True raises on any graph break: the rotation and the rest of the block are one graph
    compiled = torch.compile(block, fullgraph=True)
    with torch.set_grad_enabled(backward):
        plan = AttentionPlan(rotation, mask, positions.query)
        out = compiled(x, plan)
        eager = block(x, plan)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    if backward:
        grad = torch.randn_like(out)
        (compiled_grad,) = torch.autograd.grad(out, x, grad)
        (eager_grad,) = torch.autograd.grad(eager, x, grad)
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["alibi", "sliding", "fire", "cope"])
@pytest.mark.parametrize("grad", [False, True])
def test_block_compiles_to_one_graph_with_a_blocked_mask(pattern, grad, monkeypatch):
    """Long masks go by blocks of queries (model.BlockedMask): still one graph, and no recompilation for
    the fresh mask every forward builds."""
    import minillm.model.masks
    import minillm.model.transformer
    from minillm.positions.methods import attention_method

    torch._dynamo.reset()
    monkeypatch.setattr(minillm.model.transformer, "MASK_BUDGET", 4 * 24 * 4)  # blocks of 4 (ALiBi) or 16 queries
    rope = RotaryConfig("complex") if pattern == "sliding" else position_config(pattern)
    model = Transformer(ModelConfig(vocab_size=64, d_model=64, n_heads=4, n_kv_heads=2, n_layers=1, rope=rope))
    block = model.blocks[0]
    allowed = attention_method("sliding", {"window": 5}).parts(Positions.contiguous(0, 24, torch.device("cpu")), 24)[0].pattern \
        if pattern == "sliding" else None
    x = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(block, fullgraph=True)
    with torch.set_grad_enabled(grad), torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):  # each forward builds its positions, rotary tables and mask afresh
            positions = Positions.contiguous(0, 24, x.device)
            rotation, mask = model.position.rotation(positions), model._mask(positions, x.dtype, allowed)
            assert isinstance(mask, minillm.model.masks.BlockedMask)
            context = model.position.for_layer(0) if pattern == "cope" else None
            plan = AttentionPlan(rotation, mask, positions.query, contextual=context)
            eager = block(x, plan)
            torch.testing.assert_close(compiled(x, plan), eager, rtol=1e-5, atol=1e-5)


def test_a_peer_process_surfaces_a_failed_build_and_a_dead_child():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import PeerProcess

    with pytest.raises(RuntimeError, match="ZeroDivisionError"):  # the child's traceback, not a hang
        PeerProcess(operator.truediv, (1, 0), torch.device("cpu"))
    with pytest.raises(RuntimeError, match=r"died \(exit code 3\)"):
        PeerProcess(os._exit, (3,), torch.device("cpu"))
