"""The LightningModule: loss, optimizer and schedule, throughput and MFU metrics."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Optional

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy
import torch
import torch.nn.functional as F
from torch import nn

from minillm.data.answers import accuracy
from minillm.data.synthetic import IGNORE
from minillm.model.config import ModelConfig
from minillm.model.transformer import Transformer
from minillm.positions.base import Positions
from minillm.positions.samplers import generator_for, sampler_config
from minillm.precision import training_dtype
from minillm.train.config import OptimConfig
from minillm.train.lora import LoraConfig, apply_adapters, parameter_counts

log = logging.getLogger("minillm")

# Dense bf16 tensor-core peaks from the vendors' data sheets, for MFU on known GPUs.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                  "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024,
                       trials: int = 5, seconds: float = 0.05) -> float:
    """Achievable matmul FLOP/s of this device in `dtype`, timed: the reference for MFU where no data sheet applies."""
    # Best of several short timings: on a shared machine another process only ever slows a timing down, so
    # the fastest one is the nearest to what the device does alone (one long timing averaged the others in).
    # size 1024: BLAS runs at full speed (2 cores of an EPYC: 209 GFLOP/s in float32 against 214 at 2048; 882
    # in bfloat16 against 867), and 5 timings take 0.3 s. The dtype matters: bfloat16 ran 4x float32 there.
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up: thread pool, kernel choice
    best = 0.0
    for _ in range(trials):
        _synchronize(device)
        count, start = 0, time.perf_counter()
        while count == 0 or time.perf_counter() - start < seconds:
            a @ b
            count += 1
        _synchronize(device)
        best = max(best, 2 * size**3 * count / (time.perf_counter() - start))  # 2·n³ FLOP per n×n product
    return best


def peak_flops_for(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Peak FLOP/s per device for MFU: a known GPU's data sheet, else measured in the dtype training uses."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
    return measure_peak_flops(device, dtype)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading a clock
        torch.cuda.synchronize(device)


class TokenRate:
    """Tokens per second over an interval of steps: tokens read in it / wall time since it began, less pauses."""

    def __init__(self, step: int):
        self.step = step  # global_step when the interval began
        self.tokens = 0
        self.started = time.perf_counter()
        self.paused = 0.0
        self._pause_started: Optional[float] = None

    def pause(self) -> None:
        self._pause_started = time.perf_counter()

    def resume(self) -> None:
        if self._pause_started is not None:
            self.paused += time.perf_counter() - self._pause_started
            self._pause_started = None

    def restart(self, step: int) -> float:
        """Tokens per second over the interval now ending; the next begins at the same instant, at `step`."""
        now = time.perf_counter()
        rate = self.tokens / (now - self.started - self.paused)
        self.step, self.tokens, self.started, self.paused = step, 0, now, 0.0
        return rate


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def matrix_ids(model: nn.Module) -> set[int]:
    """The ids of the model's parameters that are matrices: taken before a sharding strategy (FSDP) turns every
    parameter into a 1-D shard of itself (the parameter objects stay: use_orig_params)."""
    return {id(param) for param in model.parameters() if param.dim() >= 2}


def parameter_groups(model: nn.Module, weight_decay: float, matrices: Optional[set[int]] = None) -> list[dict]:
    """Decay matrices only; norms, biases and embeddings (tied head included) are left alone.
    matrices: matrix_ids(model) as it was before sharding; None: read from the parameters' shapes now."""
    matrices = matrix_ids(model) if matrices is None else matrices
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        (decay if id(param) in matrices and id(param) not in embeddings else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class NonFiniteLossError(ValueError):
    """The training loss was NaN or infinite on more steps than trainer.max_bad_steps allows."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class LanguageModelTask(L.LightningModule):
    """Next-token prediction on windows of context_length tokens."""

    def __init__(self, model: dict, optim: dict, compile: bool = False, peak_flops: Optional[float] = None,
                 max_bad_steps: int = 0, positions: Optional[dict] = None, seed: int = 0,
                 lora: Optional[dict] = None):
        super().__init__()
        # Plain dicts, so the checkpoint rebuilds the model with torch.load(weights_only=True).
        self.save_hyperparameters()
        self.model_cfg = ModelConfig.from_dict(model)
        self.optim_cfg = OptimConfig(**optim)
        self.model = Transformer(self.model_cfg)
        # Training positions (minillm.positions.samplers), drawn per step from (seed, step, rank): a resume draws the same.
        self.sampler = sampler_config(positions)
        self.seed = seed
        # Low-rank adapters (minillm.train.lora), put on in configure_model; None: every weight trains.
        self.lora = None if lora is None else LoraConfig(**lora)
        if self.lora is not None:
            self.hparams["lora"] = dataclasses.asdict(self.lora)  # alpha resolved: what a checkpoint's merge reads
        self.compile = compile
        self.peak_flops = peak_flops
        self.max_bad_steps = max_bad_steps
        self.bad_steps = 0  # steps skipped for a non-finite loss, over the whole run (kept in checkpoints)
        self.replica_spread = 0.0  # set at the end of training: how far the DDP replicas' weights drifted apart
        self.flops_per_token = self.model.flops_per_token(self.model_cfg.context_length)
        self._rate: Optional[TokenRate] = None  # begun when training starts, restarted at each log
        self._peak_raised = False  # warned once that a step beat the peak
        self._matrices: Optional[set[int]] = None  # the parameters weight decay applies to, set in configure_model
        self._counts: Optional[dict[str, int]] = None  # parameter_counts as configure_model left the model

    def configure_model(self) -> None:
        # Lightning calls this inside fit: after init_from's weights are in, before a resume's checkpoint is
        # restored, whose state_dict then holds the adapters' entries. The adapters go on before compiling, so
        # that the compiled blocks trace them.
        if self.lora is not None:
            apply_adapters(self.model, self.lora)
        if self.compile:
            self.model.compile_blocks()
        # Taken before FSDP, if it is the strategy, shards every parameter: afterwards each rank holds a 1-D part.
        self._matrices, self._counts = matrix_ids(self.model), self._parameter_counts()

    def optimizer_groups(self) -> list[dict]:
        """AdamW's parameter groups: weight decay on the matrices configure_model saw, the rest without."""
        return parameter_groups(self.model, self.optim_cfg.weight_decay, self._matrices)

    def parameter_counts(self) -> dict[str, int]:
        """The model's parameters, those training updates and all of them (the adapters' included), as they were
        before a sharding strategy split them: for the run's summary."""
        return self._counts if self._counts is not None else self._parameter_counts()

    def _parameter_counts(self) -> dict[str, int]:
        trainable, total = parameter_counts(self.model)
        return {"parameters": self.model.num_params(exclude_embeddings=False), "trainable_parameters": trainable,
                "total_parameters": total}

    def setup(self, stage: str) -> None:
        # Lightning calls setup before it moves the model, so self.device is still the CPU here; the
        # strategy's root device is the one training will run on.
        if self.peak_flops is None:
            self.peak_flops = peak_flops_for(self.trainer.strategy.root_device, training_dtype(self.trainer.precision))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.model.loss(x, y, self.step_positions(x.shape[0], x.shape[1], x.device))
        if self._non_finite(loss):
            self.bad_steps += 1
            value = loss.item() if not math.isfinite(loss.item()) else "non-finite on another rank"
            if self.bad_steps > self.max_bad_steps:
                raise NonFiniteLossError(
                    f"train/loss is {value} at step {self.global_step}: stopped after {self.bad_steps} "
                    f"non-finite step(s), more than trainer.max_bad_steps={self.max_bad_steps} allows",
                    step=self.global_step)
            log.warning("train/loss is %s at step %d: step skipped (%d of trainer.max_bad_steps=%d)",
                        value, self.global_step, self.bad_steps, self.max_bad_steps)
            return None  # Lightning then skips backward; the optimizer sees no gradients and updates nothing
        tokens_per_step = x.numel() * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tokens", float((self.global_step + 1) * tokens_per_step))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def step_positions(self, batch: int, length: int, device: torch.device) -> Optional[Positions]:
        """This step's training positions: None for contiguous ones, else the sampler's, drawn from (seed, step,
        rank) alone, so that a resumed run draws at step s what an uninterrupted one drew."""
        if self.sampler.contiguous:
            return None
        generator = generator_for(self.seed, self.global_step, self.global_rank)
        return self.sampler.positions(batch, length, generator, device)

    def _non_finite(self, loss: torch.Tensor) -> bool:
        bad = not bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:  # every rank skips or stops together, or DDP's all-reduce would hang
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        return bad

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["bad_steps"] = self.bad_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.bad_steps = int(checkpoint.get("bad_steps", 0))

    def on_train_end(self) -> None:
        # DDP keeps replicas equal by construction; check it, since a rank-local skip or buffer would break it.
        # Under FSDP each rank holds a different shard: nothing to compare.
        if self.trainer.world_size > 1 and not isinstance(self.trainer.strategy, FSDPStrategy):
            sums = torch.stack([p.detach().double().sum() for p in self.model.parameters()])
            gathered = self.all_gather(sums)  # (world_size, parameters)
            self.replica_spread = float((gathered.max(0).values - gathered.min(0).values).abs().max())

    def on_train_start(self) -> None:
        self._rate = TokenRate(self.global_step)  # a resumed run counts from the step it resumed at

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Throughput over the logging interval, not one step: one step's time swings with the data loader and
        # the machine's other work. The wall time between two logs includes loading batches, the optimizer and
        # periodic checkpoint writes (time the run really spends), but not validation (nor the checkpoint written
        # at its end), which pauses the clock.
        self._rate.tokens += batch[0].numel() * self.trainer.world_size
        step, every = self.trainer.global_step, self.trainer.log_every_n_steps
        # global_step has counted this step already: it is the `batches_that_stepped + 1` Lightning logs on
        if every and (step % every == 0 or self.trainer.should_stop) and step != self._rate.step:
            _synchronize(self.device)
            self._log_throughput(self._rate.restart(step))

    def _log_throughput(self, tokens_per_s: float) -> None:
        achieved = tokens_per_s * self.flops_per_token / self.trainer.world_size  # model FLOP/s per device
        if achieved > self.peak_flops:
            # The peak is an estimate (a timed matmul on a shared machine, or a data sheet); a device that runs
            # the model faster has shown it can, so the observed rate is the better estimate: MFU = achieved /
            # peak stays a fraction ≤ 1 by construction. Earlier MFU values were relative to the lower peak.
            if not self._peak_raised:
                log.warning("train/mfu: the model ran at %.3g FLOP/s per device, above the peak of %.3g; the "
                            "peak is raised to the observed rate (set trainer.peak_flops to fix it)",
                            achieved, self.peak_flops)
                self._peak_raised = True
            self.peak_flops = achieved
        self.log("train/tokens_per_s", tokens_per_s, prog_bar=True)
        self.log("train/mfu", achieved / self.peak_flops)

    def on_validation_start(self) -> None:
        if self._rate is not None and not self.trainer.sanity_checking:
            _synchronize(self.device)  # the training steps queued so far belong to training time
            self._rate.pause()

    def on_validation_end(self) -> None:
        if self._rate is not None and not self.trainer.sanity_checking:
            _synchronize(self.device)
            self._rate.resume()

    def on_validation_epoch_start(self) -> None:
        # loss sum, scored targets, and (synthetic tasks) answers and answers right
        self._val_sums = torch.zeros(4, device=self.device)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch[:2]
        if len(batch) == 2:  # text windows: every target counts
            self._val_sums[0] += self.model.token_losses(x, y).sum()
            self._val_sums[1] += y.numel()
            return
        # A synthetic task's (inputs, targets, answers): the answer tokens' loss, and exact match per answer.
        logits = self.model(x).float()
        loss_sum = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
        counts = accuracy(logits, y, batch[2])
        self._val_sums += torch.tensor([loss_sum.item(), counts.tokens, counts.answers, counts.answers_correct],
                                       device=self.device)

    def on_validation_epoch_end(self) -> None:
        # Token-weighted mean over all windows (and ranks), then perplexity from that mean.
        sums = self._val_sums
        if self.trainer.world_size > 1:
            sums = self.all_gather(sums).sum(0)
        loss = sums[0] / sums[1].clamp(min=1)
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss))
        if sums[2] > 0:
            self.log("val/exact_match", sums[3] / sums[2], prog_bar=True)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, except under bf16-mixed: there its mixed-precision plugin refuses to clip for a
        fused optimizer (which would unscale gradients itself), though bf16 has no gradient scaler and the
        gradients are the true ones, so they are clipped here by norm as Lightning would."""
        if gradient_clip_val and str(self.trainer.precision).startswith("bf16"):
            torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                           gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        cfg = self.optim_cfg
        # Fused AdamW: one kernel per step, on CPU too (13 ms against the for-loop's 37 ms for model=small).
        # Not where torch has no fused kernel (MPS, XLA), nor under 16-mixed: its gradient scaler refuses to
        # clip for an optimizer that unscales the gradients itself.
        fused = self.device.type in ("cpu", "cuda") and str(self.trainer.precision) not in ("16-mixed", "16")
        optimizer = torch.optim.AdamW(self.optimizer_groups(), lr=cfg.lr,
                                      betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
        total = self.trainer.max_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, cfg.warmup_steps, total, cfg.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
