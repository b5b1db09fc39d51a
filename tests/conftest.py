"""Shared test settings: one torch thread per test process (pytest -n 2 already uses both cores)."""

import os

import torch

torch.set_num_threads(1)
os.environ.setdefault("WANDB_SILENT", "true")
