"""Precision: the choice `auto` makes on each kind of processor (detection mocked), forced both ways; bf16 training
against float32 on a tiny run, bitwise resume in bf16, evaluation in bf16 against float32, and what a run records."""

from __future__ import annotations

import dataclasses
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from minillm import precision
from minillm.data.config import DataConfig, TokenizerConfig
from minillm.model.config import ModelConfig
from minillm.train.config import OptimConfig
from minillm.data.modules import data_module
from minillm.eval.perplexity import perplexity_at_length
from minillm.precision import eval_dtype, resolve
from minillm.train.task import LanguageModelTask
from test_train_script import assert_ok, small_run, summary, wandb_records
from test_train_script import cache_dir, env, shared, small_corpus  # noqa: F401  (fixtures of the script tests)

CPU = torch.device("cpu")


@pytest.fixture
def processor(monkeypatch):
    """Set which bf16 instructions the (mocked) CPU has: processor("AMX"), ("AVX-512 BF16") or (None)."""
    def have(native):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native == "AMX")
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native == "AVX-512 BF16")
        monkeypatch.setattr(precision, "cpu_name", lambda: "Test CPU 9000")
    return have


@pytest.mark.parametrize("native", ["AMX", "AVX-512 BF16"])
def test_auto_trains_in_bf16_where_the_cpu_multiplies_it_natively(processor, native):
    processor(native)
    assert resolve("auto", CPU) == ("bf16-mixed", f"auto: Test CPU 9000 multiplies bf16 natively ({native})")
    assert eval_dtype("auto", CPU) == (torch.bfloat16, f"auto: Test CPU 9000 multiplies bf16 natively ({native})")


def test_auto_keeps_float32_where_bf16_would_be_emulated(processor):
    processor(None)
    chosen, why = resolve("auto", CPU)
    assert chosen == "32-true" and why.startswith("auto: Test CPU 9000 has neither AVX-512 BF16 nor AMX")
    assert eval_dtype("auto", CPU)[0] == torch.float32


@pytest.mark.parametrize("native", ["AMX", None])
@pytest.mark.parametrize("asked", ["32-true", "bf16-mixed"])
def test_an_explicit_precision_is_taken_as_asked_on_any_processor(processor, native, asked):
    processor(native)
    assert resolve(asked, CPU) == (asked, f"set by trainer.precision={asked}")
    dtype = torch.bfloat16 if asked == "bf16-mixed" else torch.float32
    assert eval_dtype("bf16" if asked == "bf16-mixed" else "float32", CPU)[0] == dtype


def test_the_real_processor_is_detected_as_torch_reports_it():
    native = precision.native_bf16_cpu()
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else None
    if caps is not None:
        expected = "AMX" if caps.get("amx_tile") else "AVX-512 BF16" if caps.get("avx512_bf16") else None
        assert native == expected
    assert precision.cpu_name()


# ----------------------------------------------------------------------------------------------
# Training and evaluation in bf16 against float32 (bf16 is emulated where the CPU lacks it: same numbers, slower)

STEPS = 40


def fit(root, precision_name: str, max_steps: int = STEPS, ckpt_path=None, every: int = 0):
    """A tiny flip-flop model trained in-process on the CPU; returns (task, its per-step training losses)."""
    torch.manual_seed(0)
    data = DataConfig(path="synthetic", task="flipflop", batch_size=8, val_windows=8)
    dm = data_module(data, TokenizerConfig(), seq_len=32, seed=0)
    model = ModelConfig(vocab_size=dm.vocab_size, context_length=32, d_model=32, n_layers=2, n_heads=2)
    task = LanguageModelTask(model.to_dict(), dataclasses.asdict(OptimConfig(lr=3e-3, warmup_steps=5)),
                             peak_flops=1e9)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    callbacks = [Record()]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1, filename="{step}"))
    trainer = L.Trainer(max_steps=max_steps, precision=precision_name, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(root), callbacks=callbacks,
                        enable_checkpointing=bool(every))
    trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
    return task, losses


def test_bf16_training_follows_the_float32_loss_curve(tmp_path):
    """Same seed, same batches: bf16 matmuls change each step's loss by rounding only. Measured on a tiny
    flip-flop model over 40 steps: the curves stay within 0.05 nats of each other (mean gap ~0.01)."""
    _, full = fit(tmp_path / "f32", "32-true")
    _, half = fit(tmp_path / "bf16", "bf16-mixed")
    gaps = [abs(a - b) for a, b in zip(full, half)]
    assert len(full) == len(half) == STEPS
    assert max(gaps) < 0.05 and sum(gaps) / STEPS < 0.02, gaps
    assert full != half  # bf16 did run: rounding shows in the losses
    assert full[-1] < full[0] - 0.5 and half[-1] < half[0] - 0.5  # and both learned


def test_a_bf16_run_resumed_from_a_checkpoint_ends_bitwise_equal(tmp_path):
    uninterrupted, _ = fit(tmp_path / "full", "bf16-mixed", max_steps=12, every=6)
    checkpoint = tmp_path / "full" / "step=6.ckpt"
    resumed, _ = fit(tmp_path / "resumed", "bf16-mixed", max_steps=12, ckpt_path=checkpoint)
    for (name, a), (_, b) in zip(uninterrupted.state_dict().items(), resumed.state_dict().items()):
        assert a.dtype == torch.float32, name  # master weights stay float32
        assert torch.equal(a, b), name


def test_bf16_evaluation_agrees_with_float32_within_half_a_percent(tmp_path):
    task, _ = fit(tmp_path / "f32", "32-true", max_steps=STEPS)
    model = task.model.eval()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 257), generator=torch.Generator().manual_seed(0))
    full = perplexity_at_length(model, tokens, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = perplexity_at_length(model, tokens, 128)
    assert abs(half.ppl / full.ppl - 1) < 0.005, (half.ppl, full.ppl)


# ----------------------------------------------------------------------------------------------
# What a run records


def test_a_run_records_the_precision_it_used_and_why(tmp_path, env, cache_dir, small_corpus):
    """In summary.json and in the W&B run's config (offline here): the precision used, and why it was chosen."""
    assert_ok(small_run(env, cache_dir, tmp_path / "forced", f"data.path={small_corpus}",
                        "trainer.precision=bf16-mixed", "trainer.max_steps=3"))
    done = summary(tmp_path / "forced")
    assert done["precision"] == "bf16-mixed" and done["precision_reason"] == "set by trainer.precision=bf16-mixed"
    (run,) = [r.run for r in wandb_records(tmp_path / "forced") if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert (config["precision_used"], config["precision_reason"]) == ("bf16-mixed", done["precision_reason"])
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert_ok(small_run(env, cache_dir, tmp_path / "auto", f"data.path={small_corpus}", "logger=none",
                        "trainer.max_steps=3"))
    done = summary(tmp_path / "auto")
    assert (done["precision"], done["precision_reason"]) == resolve("auto", CPU)  # this machine's processor
