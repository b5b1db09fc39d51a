"""The LightningModule: schedule values by hand, weight-decay groups by identity, and a real Trainer run
on the CPU whose loss falls, whose logged metrics agree with each other, and whose checkpoint reloads."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import minillm.train.task as task_module
from minillm.runs import load_model
from minillm.model.config import ModelConfig
from minillm.train.config import OptimConfig
from minillm.model.transformer import Transformer
from minillm.train.task import (LanguageModelTask, TokenRate, measure_peak_flops, parameter_groups, peak_flops_for, warmup_cosine)
from minillm.precision import training_dtype

# ----------------------------------------------------------------------------------------------
# The schedule


def test_warmup_cosine_by_hand():
    # warm-up 10 steps, then cosine over the 100 steps to total = 110, down to 0.1
    def lr(step):
        return warmup_cosine(step, warmup_steps=10, total_steps=110, min_ratio=0.1)

    assert lr(0) == pytest.approx(0.1)  # (0 + 1) / 10: the first step already moves
    assert lr(4) == pytest.approx(0.5)
    assert lr(9) == pytest.approx(1.0)  # last warm-up step reaches the peak
    assert lr(10) == pytest.approx(1.0)  # end of warm-up: cosine at progress 0
    assert lr(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.sqrt(0.5)))  # a quarter: cos(π/4)
    assert lr(60) == pytest.approx(0.55)  # midpoint: halfway between 1 and 0.1
    assert lr(110) == pytest.approx(0.1)  # end: min ratio
    assert lr(111) == pytest.approx(0.1) and lr(10_000) == pytest.approx(0.1)  # past the end: stays there


def test_warmup_cosine_without_warmup_starts_at_the_peak_and_decays_monotonically():
    values = [warmup_cosine(step, 0, 20, 0.0) for step in range(25)]
    assert values[0] == pytest.approx(1.0)
    assert values[10] == pytest.approx(0.5)
    assert values[20] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(values, values[1:]))


# ----------------------------------------------------------------------------------------------
# Weight-decay groups


def expected_groups(model: Transformer) -> tuple[set[int], set[int]]:
    """(decay, no_decay) ids, written out from the architecture rather than from shapes."""
    decay = {id(m.weight) for block in model.blocks for m in (block.attn.qkv, block.attn.proj, block.ffn.up,
                                                                 block.ffn.down)}
    no_decay = {id(model.embed.weight)} | {id(p) for p in model.norm.parameters()}  # gain (and bias)
    for block in model.blocks:
        no_decay |= {id(block.attn_norm.weight), id(block.ffn_norm.weight)}
        no_decay |= {id(p) for norm in (block.attn.q_norm, block.attn.k_norm) for p in norm.parameters()}
        no_decay |= {id(m.bias) for m in block.modules() if isinstance(m, (nn.Linear, nn.LayerNorm))
                     and m.bias is not None}
    if hasattr(model.position, "table"):
        no_decay.add(id(model.position.table.weight))
    if model.cfg.tie_embeddings:
        assert model.head.weight is model.embed.weight  # one tensor: counted as the embedding
    else:
        decay.add(id(model.head.weight))  # an untied head is an ordinary projection
    return decay, no_decay


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("extras", [
    dict(),
    dict(bias=True, norm="layernorm", qk_norm=True, rope={"variant": "learned"}),  # as a checkpoint stores it
], ids=["plain", "biases-layernorm-qknorm-learned"])
def test_parameter_groups_by_identity(tied, extras):
    model = Transformer(ModelConfig(vocab_size=50, context_length=16, d_model=32, n_layers=2, n_heads=2,
                                    tie_embeddings=tied, **extras))
    decay_group, no_decay_group = parameter_groups(model, weight_decay=0.1)
    assert decay_group["weight_decay"] == 0.1 and no_decay_group["weight_decay"] == 0.0

    listed = [id(p) for group in (decay_group, no_decay_group) for p in group["params"]]
    assert len(listed) == len(set(listed)), "a parameter appears twice"
    assert set(listed) == {id(p) for p in model.parameters()}, "a parameter is missing"

    decay, no_decay = expected_groups(model)
    assert {id(p) for p in decay_group["params"]} == decay
    assert {id(p) for p in no_decay_group["params"]} == no_decay
    if "rope" in extras:
        assert id(model.position.table.weight) in no_decay  # learned positions are embeddings too


def test_parameter_groups_skip_frozen_parameters():
    model = Transformer(ModelConfig(vocab_size=50, context_length=16, d_model=32, n_layers=1, n_heads=2))
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    groups = parameter_groups(model, 0.1)
    assert all(p is not model.blocks[0].attn.qkv.weight for g in groups for p in g["params"])


# ----------------------------------------------------------------------------------------------
# Peak FLOP/s for MFU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measure_peak_flops_is_positive_and_finite(dtype):
    flops = measure_peak_flops(torch.device("cpu"), dtype, size=128, trials=2, seconds=0.02)
    assert math.isfinite(flops) and flops > 1e6  # even a slow core does more than a megaflop


class ScriptedClock:
    """time.perf_counter's stand-in: returns the given instants in order."""

    def __init__(self, instants):
        self.instants = list(instants)

    def perf_counter(self) -> float:
        return self.instants.pop(0)


def test_measured_peak_is_the_fastest_of_several_timings(monkeypatch):
    # seconds=0: each timing is one product; its clock reads start, the loop's check, the end.
    durations = [0.4, 0.1, 0.3]  # the second timing ran alone; the others shared the machine
    clock = ScriptedClock(t for i, d in enumerate(durations) for t in (i, i, i + d))
    monkeypatch.setattr(task_module, "time", clock)
    flops = measure_peak_flops(torch.device("cpu"), size=8, trials=3, seconds=0.0)
    assert flops == pytest.approx(2 * 8**3 / 0.1)  # 2·n³ FLOP in the fastest timing
    assert clock.instants == []  # every timing was read


@pytest.mark.parametrize("precision, dtype", [("32-true", torch.float32), ("32", torch.float32),
                                              ("bf16-mixed", torch.bfloat16), ("bf16-true", torch.bfloat16),
                                              ("16-mixed", torch.float16), ("64-true", torch.float32)])
def test_peak_is_measured_in_the_dtype_training_uses(monkeypatch, precision, dtype):
    assert training_dtype(precision) == dtype
    seen = []
    monkeypatch.setattr(task_module, "measure_peak_flops", lambda device, dtype: seen.append((device, dtype)) or 5e9)
    assert peak_flops_for(torch.device("cpu"), training_dtype(precision)) == 5e9
    assert seen == [(torch.device("cpu"), dtype)]


def test_known_gpu_peak_comes_from_the_data_sheet(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(task_module, "measure_peak_flops", lambda *args: pytest.fail("a known GPU is not timed"))
    assert peak_flops_for(torch.device("cuda", 0)) == 989e12
    assert peak_flops_for(torch.device("cuda", 0), torch.bfloat16) == 989e12


@pytest.mark.parametrize("precision, dtype", [("32-true", torch.float32), ("bf16-mixed", torch.bfloat16)])
def test_peak_flops_is_measured_on_the_device_training_runs_on(monkeypatch, precision, dtype):
    # Lightning calls setup() before moving the module, so the module's own device is still the CPU there.
    seen = []
    monkeypatch.setattr(task_module, "peak_flops_for", lambda device, dtype: seen.append((device, dtype)) or 1e15)
    task = LanguageModelTask(tiny_model_config().to_dict(), dataclasses.asdict(OptimConfig()))
    task.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), precision=precision)
    task.setup("fit")
    assert seen == [(torch.device("cuda", 0), dtype)] and task.peak_flops == 1e15


def test_token_rate_is_tokens_over_the_interval_less_its_pauses(monkeypatch):
    clock = ScriptedClock([10.0, 11.0, 21.0, 24.0, 26.0])
    monkeypatch.setattr(task_module, "time", clock)
    rate = TokenRate(step=5)  # begins at 10 s
    rate.tokens += 300
    rate.pause()  # 11 s
    rate.resume()  # 21 s: 10 s of validation, not training time
    assert rate.restart(step=8) == pytest.approx(300 / (24 - 10 - (21 - 11)))  # 75 tokens/s
    assert (rate.step, rate.tokens, rate.started, rate.paused) == (8, 0, 24.0, 0.0)  # the next begins at once
    rate.tokens += 50
    assert rate.restart(step=9) == pytest.approx(50 / (26 - 24))


def test_compile_compiles_the_blocks_training_runs_through(monkeypatch):
    compiled = []
    monkeypatch.setattr(Transformer, "compile_blocks", lambda self, **kwargs: compiled.append(self))
    LanguageModelTask(tiny_model_config().to_dict(), dataclasses.asdict(OptimConfig())).configure_model()
    assert compiled == []
    task = LanguageModelTask(tiny_model_config().to_dict(), dataclasses.asdict(OptimConfig()), compile=True)
    task.configure_model()
    assert compiled == [task.model]


@pytest.mark.parametrize("precision, fused", [("32-true", True), ("bf16-mixed", True), ("16-mixed", False)])
def test_adamw_is_fused_except_under_16_mixed(precision, fused):
    task = LanguageModelTask(tiny_model_config().to_dict(), dataclasses.asdict(OptimConfig()))
    task.trainer = SimpleNamespace(precision=precision, max_steps=10)
    optimizer = task.configure_optimizers()["optimizer"]
    assert bool(optimizer.defaults["fused"]) is fused


# ----------------------------------------------------------------------------------------------
# A real Trainer on the CPU


PATTERN = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # period 10 over a 16-token vocabulary: learnable from context
SEQ_LEN, BATCH, MAX_STEPS, VAL_EVERY, PEAK = 16, 8, 36, 12, 1e12
OPTIM = OptimConfig(lr=1e-2, warmup_steps=4, min_lr_ratio=0.1)


def tiny_model_config() -> ModelConfig:
    return ModelConfig(vocab_size=16, context_length=SEQ_LEN, d_model=32, n_layers=2, n_heads=2)


def pattern_windows() -> TensorDataset:
    stream = torch.tensor(PATTERN * 8)
    starts = range(len(PATTERN) * 4)
    x = torch.stack([stream[s:s + SEQ_LEN] for s in starts])
    y = torch.stack([stream[s + 1:s + SEQ_LEN + 1] for s in starts])
    return TensorDataset(x, y)


class RecordingLogger(Logger):
    """Keeps every log_metrics call in memory: (step, {key: value})."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.hparams: dict = {}

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self.hparams = dict(params)

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, {k: float(v) for k, v in metrics.items()}))

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(step, row[key]) for step, row in self.rows if key in row]


def fit(tmp_path, peak_flops, max_steps=MAX_STEPS, log_every_n_steps=1, callbacks=()):
    L.seed_everything(0)
    task = LanguageModelTask(tiny_model_config().to_dict(), dataclasses.asdict(OPTIM), peak_flops=peak_flops)
    logger = RecordingLogger()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="best", monitor="val/loss",
                                  mode="min", save_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, val_check_interval=VAL_EVERY,
                        check_val_every_n_epoch=None, log_every_n_steps=log_every_n_steps, gradient_clip_val=1.0,
                        logger=logger, callbacks=[checkpoints, *callbacks], default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    windows = pattern_windows()
    train = DataLoader(windows, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(windows, batch_size=BATCH)
    trainer.fit(task, train, val)
    return SimpleNamespace(task=task, trainer=trainer, logger=logger, checkpoints=checkpoints)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("task"), peak_flops=PEAK)


def test_training_lowers_the_loss(trained):
    first = trained.logger.series("train/loss")[0][1]
    assert first == pytest.approx(math.log(16), abs=0.3)  # chance level with a small init
    val = [loss for _, loss in trained.logger.series("val/loss")]
    assert len(val) == MAX_STEPS // VAL_EVERY
    assert val[-1] < 0.5 * first, f"val/loss went {first:.3f} -> {val}"
    assert val[-1] < val[0]
    assert trained.trainer.global_step == MAX_STEPS


def test_logged_keys_and_perplexity(trained):
    keys = set().union(*(row for _, row in trained.logger.rows))
    assert {"train/loss", "train/lr", "train/tokens", "train/tokens_per_s", "train/mfu", "val/loss",
            "val/ppl"} <= keys
    for step, row in trained.logger.rows:
        if "val/loss" in row:
            assert row["val/ppl"] == pytest.approx(math.exp(row["val/loss"]), rel=1e-5)
    # tokens: batch · seq_len per step, counted through the step just taken
    assert trained.logger.series("train/tokens")[:3] == [(0, 128.0), (1, 256.0), (2, 384.0)]
    assert dict(trained.logger.series("train/tokens"))[MAX_STEPS - 1] == MAX_STEPS * BATCH * SEQ_LEN


def test_validation_loss_is_the_token_weighted_mean(trained):
    model = trained.task.model.eval()
    x, y = pattern_windows().tensors
    with torch.no_grad():
        expected = model.token_losses(x, y).mean().item()
    assert trained.trainer.callback_metrics["val/loss"].item() == pytest.approx(expected, rel=1e-5)


def test_logged_lr_follows_the_schedule(trained):
    lrs = dict(trained.logger.series("train/lr"))
    assert sorted(lrs) == list(range(MAX_STEPS))
    for step in (0, 3, 4, MAX_STEPS // 2, MAX_STEPS - 1):
        expected = OPTIM.lr * warmup_cosine(step, OPTIM.warmup_steps, MAX_STEPS, OPTIM.min_lr_ratio)
        assert lrs[step] == pytest.approx(expected, rel=1e-6), step
    assert max(lrs.values()) == pytest.approx(OPTIM.lr, rel=1e-6)


def test_optimizer_decays_only_the_matrices(trained):
    optimizer = trained.trainer.optimizers[0]
    assert optimizer.defaults["fused"] is True  # the one-kernel AdamW, on CPU as on CUDA
    assert [g["weight_decay"] for g in optimizer.param_groups] == [OPTIM.weight_decay, 0.0]
    decay, no_decay = expected_groups(trained.task.model)
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == decay
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == no_decay


def test_mfu_uses_the_given_peak_flops(trained):
    flops_per_token = trained.task.model.flops_per_token(SEQ_LEN)
    assert trained.task.flops_per_token == flops_per_token and trained.task.peak_flops == PEAK
    rows = [row for _, row in trained.logger.rows if "train/mfu" in row]
    assert len(rows) == MAX_STEPS  # log_every_n_steps=1: every step, the first timed from the start of training
    for row in rows:
        assert row["train/tokens_per_s"] > 0
        assert row["train/mfu"] == pytest.approx(row["train/tokens_per_s"] * flops_per_token / PEAK, rel=1e-5)


class StepClock(Callback):
    """A stand-in for time.perf_counter that training steps and validation batches move forward by set amounts."""

    VALIDATION_BATCH_SECONDS = 100.0  # far longer than the steps: counted, it would swamp the rate

    def __init__(self):
        self.now = 0.0
        self.step_seconds: list[float] = []  # by global step

    def perf_counter(self) -> float:
        return self.now

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # Uneven steps, 10, 20, 30 ms, like a loader that stalls now and then: one step's rate is not the interval's.
        seconds = 0.01 * (1 + trainer.global_step % 3)
        self.now += seconds
        self.step_seconds.append(seconds)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.now += self.VALIDATION_BATCH_SECONDS


def test_tokens_per_s_is_the_rate_over_the_logging_interval(tmp_path, monkeypatch):
    clock = StepClock()
    monkeypatch.setattr(task_module, "time", clock)  # peak_flops is given, so nothing else here reads it
    run = fit(tmp_path, peak_flops=PEAK, max_steps=20, log_every_n_steps=5, callbacks=[clock])
    rates = run.logger.series("train/tokens_per_s")
    assert [step for step, _ in rates] == [4, 9, 14, 19]  # the logger's steps count from 0: global steps 5, 10, ...
    assert len(clock.step_seconds) == 20 and len(run.logger.series("val/loss")) == 1  # after step 12, in (10, 15]
    for (step, rate), begun in zip(rates, [0, 5, 10, 15]):
        ended = step + 1
        tokens = (ended - begun) * BATCH * SEQ_LEN
        assert rate == pytest.approx(tokens / sum(clock.step_seconds[begun:ended]), rel=1e-6), step  # float32 logs
        assert rate != pytest.approx(BATCH * SEQ_LEN / clock.step_seconds[step], rel=1e-3)  # not the last step's
    mfu = dict(run.logger.series("train/mfu"))
    for step, rate in rates:
        assert mfu[step] == pytest.approx(rate * run.task.flops_per_token / PEAK, rel=1e-6)  # the same figure


def test_mfu_never_exceeds_one_when_the_peak_is_too_low(tmp_path):
    tiny_peak = 1.0  # FLOP/s: any real step beats it
    run = fit(tmp_path, peak_flops=tiny_peak, max_steps=6)
    rates = [rate for _, rate in run.logger.series("train/tokens_per_s")]
    mfu = [value for _, value in run.logger.series("train/mfu")]
    assert len(rates) == len(mfu) == 6
    peak = tiny_peak
    for rate, value in zip(rates, mfu):  # the peak rises to the fastest rate seen so far
        achieved = rate * run.task.flops_per_token
        peak = max(peak, achieved)
        assert value == pytest.approx(achieved / peak, rel=1e-6) and 0 < value <= 1
    assert mfu[0] == 1.0 and max(mfu) == 1.0
    assert run.task.peak_flops == pytest.approx(max(rates) * run.task.flops_per_token, rel=1e-6)


def test_peak_flops_is_measured_when_not_given(tmp_path):
    run = fit(tmp_path, peak_flops=None, max_steps=3)
    peak = run.task.peak_flops
    assert peak is not None and math.isfinite(peak) and peak > 1e6
    rows = [row for _, row in run.logger.rows if "train/mfu" in row]
    assert len(rows) == 3
    for row in rows:
        assert 0 < row["train/mfu"] <= 1
        assert row["train/mfu"] == pytest.approx(row["train/tokens_per_s"] * run.task.flops_per_token / peak,
                                                 rel=1e-5)


def test_checkpoint_is_plain_and_rebuilds_the_trained_model(trained):
    path = trained.checkpoints.last_model_path
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # no pickled config objects
    assert checkpoint["global_step"] == MAX_STEPS
    hparams = checkpoint["hyper_parameters"]
    assert hparams["model"] == tiny_model_config().to_dict()
    assert hparams["optim"] == dataclasses.asdict(OPTIM)

    rebuilt = load_model(path)
    assert rebuilt.cfg == tiny_model_config()
    x = pattern_windows().tensors[0][:4]
    trained.task.model.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trained.task.model(x))
    assert trained.checkpoints.best_model_path.endswith("best.ckpt")
    assert load_model(trained.checkpoints.best_model_path).cfg == tiny_model_config()


def test_step_positions_depend_on_seed_step_and_rank_alone(monkeypatch):
    """A resumed run draws at step s what an uninterrupted one drew; contiguous training draws nothing."""
    from minillm.positions.samplers import PoSESampler, generator_for

    pose = {"sampler": "pose", "chunks": 2, "target_length": 64}
    first = LanguageModelTask(tiny_model_config().to_dict(), dataclasses.asdict(OptimConfig()), positions=pose, seed=3)
    second = LanguageModelTask(tiny_model_config().to_dict(), dataclasses.asdict(OptimConfig()), positions=pose, seed=3)
    for task, step in ((first, 5), (second, 5)):
        monkeypatch.setattr(type(task), "global_step", property(lambda self, s=step: s))
    drawn = first.step_positions(4, 16, torch.device("cpu"))
    assert torch.equal(drawn.query, second.step_positions(4, 16, torch.device("cpu")).query)
    expected = PoSESampler(target_length=64).positions(4, 16, generator_for(3, 5, 0))
    assert torch.equal(drawn.query, expected.query) and int(drawn.query.max()) < 64
    monkeypatch.setattr(type(first), "global_step", property(lambda self: 6))
    assert not torch.equal(drawn.query, first.step_positions(4, 16, torch.device("cpu")).query)
    plain = LanguageModelTask(tiny_model_config().to_dict(), dataclasses.asdict(OptimConfig()))
    assert plain.step_positions(4, 16, torch.device("cpu")) is None
