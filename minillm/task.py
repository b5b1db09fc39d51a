"""The LightningModule: loss, optimizer and schedule, throughput and MFU metrics."""

from __future__ import annotations

import logging
import math
import time
from typing import Optional

import lightning as L
import torch
from torch import nn

from minillm.config import ModelConfig, OptimConfig
from minillm.model import Transformer

log = logging.getLogger("minillm")

# Dense bf16 tensor-core peaks from the vendors' data sheets, for MFU on known GPUs.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                  "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}


def measure_peak_flops(device: torch.device, size: int = 1024, seconds: float = 0.3) -> float:
    """Achievable matmul FLOP/s of this device, timed: the reference for MFU where no data sheet applies."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * count / (time.perf_counter() - start)


def peak_flops_for(device: torch.device) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
    return measure_peak_flops(device)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; norms, biases and embeddings (tied head included) are left alone."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class NonFiniteLossError(ValueError):
    """The training loss was NaN or infinite on more steps than trainer.max_bad_steps allows."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class LanguageModelTask(L.LightningModule):
    """Next-token prediction on windows of context_length tokens."""

    def __init__(self, model: dict, optim: dict, compile: bool = False, peak_flops: Optional[float] = None,
                 max_bad_steps: int = 0):
        super().__init__()
        # Plain dicts, so the checkpoint rebuilds the model with torch.load(weights_only=True).
        self.save_hyperparameters()
        self.model_cfg = ModelConfig.from_dict(model)
        self.optim_cfg = OptimConfig(**optim)
        self.model = Transformer(self.model_cfg)
        self.compile = compile
        self.peak_flops = peak_flops
        self.max_bad_steps = max_bad_steps
        self.bad_steps = 0  # steps skipped for a non-finite loss, over the whole run (kept in checkpoints)
        self.replica_spread = 0.0  # set at the end of training: how far the DDP replicas' weights drifted apart
        self.flops_per_token = self.model.flops_per_token(self.model_cfg.context_length)
        self._step_started: Optional[float] = None
        self._tokens_per_second: Optional[float] = None

    def configure_model(self) -> None:
        if self.compile:
            self.model.compile_blocks()

    def setup(self, stage: str) -> None:
        # Lightning calls setup before it moves the model, so self.device is still the CPU here; the
        # strategy's root device is the one training will run on.
        if self.peak_flops is None:
            self.peak_flops = peak_flops_for(self.trainer.strategy.root_device)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.model.loss(x, y)
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
        if self._tokens_per_second is not None:
            self.log("train/tokens_per_s", self._tokens_per_second, prog_bar=True)
            self.log("train/mfu", self._tokens_per_second * self.flops_per_token / (self.peak_flops * self.trainer.world_size))
        return loss

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
        if self.trainer.world_size > 1:
            sums = torch.stack([p.detach().double().sum() for p in self.model.parameters()])
            gathered = self.all_gather(sums)  # (world_size, parameters)
            self.replica_spread = float((gathered.max(0).values - gathered.min(0).values).abs().max())

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._step_started is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            elapsed = time.perf_counter() - self._step_started
            self._tokens_per_second = batch[0].numel() * self.trainer.world_size / elapsed

    def on_validation_epoch_start(self) -> None:
        self._val_loss_sum = torch.zeros((), device=self.device)
        self._val_count = torch.zeros((), device=self.device)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self._val_loss_sum += self.model.token_losses(x, y).sum()
        self._val_count += y.numel()

    def on_validation_epoch_end(self) -> None:
        # Token-weighted mean over all windows (and ranks), then perplexity from that mean.
        loss_sum, count = self._val_loss_sum, self._val_count
        if self.trainer.world_size > 1:
            loss_sum, count = self.all_gather(loss_sum).sum(), self.all_gather(count).sum()
        loss = loss_sum / count.clamp(min=1)
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss))

    def configure_optimizers(self):
        cfg = self.optim_cfg
        # Fused AdamW: one kernel per step, on CPU too (13 ms against the for-loop's 37 ms for model=small).
        # Not where torch has no fused kernel (MPS, XLA), nor under 16-mixed: its gradient scaler refuses to
        # clip for an optimizer that unscales the gradients itself.
        fused = self.device.type in ("cpu", "cuda") and str(self.trainer.precision) not in ("16-mixed", "16")
        optimizer = torch.optim.AdamW(parameter_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                      betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
        total = self.trainer.max_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, cfg.warmup_steps, total, cfg.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
