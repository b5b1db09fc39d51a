"""RMSNorm, forward + backward (gradients of the input and the gain), ours against the other ways to run it.

Peers measured in the same run, on the same input, gain and output gradient (their outputs and gradients
are checked equal first):
    ours          minillm.model.transformer.RMSNorm: its own autograd Function, the backward through torch's fused
                  layer-norm backward kernel (see _RMSNormFunction)
    formula       x · rsqrt(mean(x²) + eps) · g in float32, differentiated by autograd op by op (what
                  RMSNorm runs under torch.compile, where Inductor fuses it)
    torch         torch.nn.functional.rms_norm
    transformers  LlamaRMSNorm, where transformers is installed

Shapes: (tokens, d_model) of the tiny and small training steps, and of a base-sized one. float32, as the
residual stream is under bf16 autocast too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common import Settings, print_table, speedup, time_peers
from minillm.model.transformer import RMSNorm

EPS = 1e-5


def shapes(device: torch.device, quick: bool) -> list[tuple[int, int]]:
    if quick:
        return [(64, 32)]
    if device.type == "cuda":
        return [(16384, 768), (16384, 2048)]
    return [(4096, 128), (2048, 384), (8192, 768)]


def peers_for(dim: int, gain: torch.Tensor, transformers) -> dict:
    """peer -> (x ↦ normed x, that peer's gain parameter), every gain a copy of `gain`."""

    def module_peer(module):
        module = module.to(gain.device)
        with torch.no_grad():
            module.weight.copy_(gain)
        return module, module.weight

    formula_gain, torch_gain = gain.clone().requires_grad_(), gain.clone().requires_grad_()
    peers = {
        "ours": module_peer(RMSNorm(dim, EPS)),
        "formula": (lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * formula_gain, formula_gain),
        "torch": (lambda x: F.rms_norm(x, (dim,), torch_gain, EPS), torch_gain),
    }
    if transformers is not None:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        peers["transformers"] = module_peer(LlamaRMSNorm(dim, eps=EPS))
    return peers


def run(settings: Settings) -> dict:
    device = settings.device
    rows = []
    for tokens, dim in shapes(device, settings.quick):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, dim, generator=g).to(device).requires_grad_()
        grad = torch.randn(tokens, dim, generator=g).to(device)
        gain = (torch.rand(dim, generator=g) + 0.5).to(device)
        peers = peers_for(dim, gain, settings.transformers)

        def step(fn, weight):
            x.grad = weight.grad = None
            fn(x).backward(grad)
            return x.grad, weight.grad

        results = {name: [t.clone() for t in step(fn, weight)] for name, (fn, weight) in peers.items()}
        for name, result in results.items():  # the same gradients, or the timing means nothing
            for ours, theirs in zip(results["ours"], result):
                torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        timings = time_peers({name: (lambda fn=fn, w=weight: step(fn, w)) for name, (fn, weight) in peers.items()},
                             device, settings.rounds, settings.min_sample_s)
        row = {"tokens": tokens, "dim": dim, **{name: t.as_dict() for name, t in timings.items()}}
        row["speedup"] = {name: speedup(timings, "ours", name) for name in timings if name != "ours"}
        rows.append(row)
    print_results(rows)
    return {"rows": rows}


def print_results(rows: list[dict]) -> None:
    peers = [p for p in ("formula", "torch", "transformers") if p in rows[0]["speedup"]]
    table = [[f"{r['tokens']} x {r['dim']}", r["ours"]["median_s"] * 1e3, *(r[p]["median_s"] * 1e3 for p in peers),
              *(f"{r['speedup'][p]['wall']:.2f}x" for p in peers)] for r in rows]
    print_table("RMSNorm, forward + backward (float32)",
                ["tokens x d", "ours ms", *(f"{p} ms" for p in peers), *(f"vs {p}" for p in peers)], table,
                ("formula: x * rsqrt(mean(x^2) + eps) * g under autograd; torch: F.rms_norm; "
                 "transformers: LlamaRMSNorm",))
