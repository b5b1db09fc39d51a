"""Rotary application to q and k together, forward and forward+backward, every layout with and without XPos.

Peers measured in the same run, on the same q, k and output gradients:
    reference:<layout>    rope.py's reference formula on precomputed tables (the textbook expression)
    transformers          HF LLaMA: LlamaRotaryEmbedding (cos/sin per call) + apply_rotary_pos_emb
    transformers-apply    apply_rotary_pos_emb alone, on cos/sin computed once (as a model shares them
                          across layers): the stricter peer, against which the target is read
    copy                  q and k cloned (and the output gradients, with backward): torch's copy kernel
                          moving the same bytes, the attainable bandwidth of this device

Ours apply the tables of one forward, built once by RotaryEmbedding.rotation (as the transformer builds
them once per forward for every layer); the time to build them is measured on its own ("tables").

Bytes that must move: q and k read once and written once (forward), the output gradients read once
and the input gradients written once (backward), plus one read of the cos/sin tables each way (two
tables per side with XPos, whose scales differ for q and k). Achieved bandwidth = those bytes / time.
"""

from __future__ import annotations

import torch

from common import Settings, print_table, speedup, time_peers
from minillm.kernels import triton_applies
from minillm.positions.rotary import ROTARY_FUNCTIONS, ROTARY_LAYOUTS, RotaryEmbedding
from minillm.positions.base import Positions
from minillm.positions.scaling import rotary_inv_freq

HEADS = 8
XPOS_SCALE_BASE = 512.0
# Data-sheet HBM bandwidth (bytes/s), for the fraction of peak on known GPUs.
GPU_PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.04e12,
                      "A100": 1.56e12}  # first match wins: "NVIDIA H100 80GB HBM3" is the SXM part


def shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int]]:
    """(batch, seq, head_dim) with a fixed number of tokens per case, so cases differ in shape only."""
    if quick:
        return [(2, 64, 32)]
    tokens = 65536 if device.type == "cuda" else 8192
    return [(tokens // seq, seq, head_dim) for head_dim in (64, 128) for seq in (512, 2048, 8192)]


def hf_peers(transformers, q: torch.Tensor, k: torch.Tensor, head_dim: int) -> dict:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = transformers.LlamaConfig(hidden_size=HEADS * head_dim, num_attention_heads=HEADS, head_dim=head_dim,
                                      rope_theta=10000.0, max_position_embeddings=q.shape[-2])
    rotary = LlamaRotaryEmbedding(config).to(q.device)
    position_ids = torch.arange(q.shape[-2], device=q.device)[None].expand(q.shape[0], -1)
    with torch.no_grad():
        cos, sin = rotary(q, position_ids)

    def with_embedding(q, k):
        return apply_rotary_pos_emb(q, k, *rotary(q, position_ids))

    return {"transformers": with_embedding, "transformers-apply": lambda q, k: apply_rotary_pos_emb(q, k, cos, sin)}


def reference_peer(layout: str, seq: int, head_dim: int, device: torch.device):
    """The layout's reference formula on tables built once: the kernel, nothing else."""
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), rotary_inv_freq(10000.0, head_dim))
    cos, sin = angles.cos().float().to(device), angles.sin().float().to(device)
    formula = ROTARY_FUNCTIONS[layout]
    return lambda q, k: (formula(q.float(), cos, sin).to(q.dtype), formula(k.float(), cos, sin).to(k.dtype))


def run(settings: Settings) -> dict:
    device, quick, rounds, min_sample_s = settings.device, settings.quick, settings.rounds, settings.min_sample_s
    transformers = settings.transformers
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = next((bw for key, bw in GPU_PEAK_BANDWIDTH.items() if key in torch.cuda.get_device_name(device)),
                None) if device.type == "cuda" else None
    cases = []
    for batch, seq, head_dim in shapes(device, quick):
        g = torch.Generator(device).manual_seed(0)
        q, k, grad_q, grad_k = (torch.randn(batch, HEADS, seq, head_dim, generator=g, device=device, dtype=dtype)
                                for _ in range(4))
        q.requires_grad_(), k.requires_grad_()
        functions, positions = {}, Positions.contiguous(0, seq, device)
        encodings = {}
        for layout in ROTARY_LAYOUTS:
            encodings[f"ours:{layout}"] = RotaryEmbedding(head_dim, layout).to(device)
            encodings[f"ours:{layout}+xpos"] = RotaryEmbedding(head_dim, layout, xpos_scale_base=XPOS_SCALE_BASE).to(device)
        functions.update({name: encoding.rotation(positions) for name, encoding in encodings.items()})
        for layout in ROTARY_LAYOUTS:
            functions[f"reference:{layout}"] = reference_peer(layout, seq, head_dim, device)
        if transformers is not None:
            functions.update(hf_peers(transformers, q, k, head_dim))

        def forward(fn):
            def call():
                with torch.no_grad():
                    fn(q, k)
            return call

        def forward_backward(fn):
            def call():
                q_out, k_out = fn(q, k)
                torch.autograd.grad((q_out, k_out), (q, k), (grad_q, grad_k))
            return call

        def copy(mode):  # the same tensors read and written once by torch's copy kernel, no autograd
            def call():
                with torch.no_grad():
                    q.clone(), k.clone()
                    if mode == "forward_backward":
                        grad_q.clone(), grad_k.clone()
            return call

        data_bytes = 2 * (q.numel() + k.numel()) * q.element_size()  # read + write of q and k
        table_bytes = seq * head_dim // 2 * 2 * 4  # cos and sin, float32, one side
        case = {"batch": batch, "heads": HEADS, "seq": seq, "head_dim": head_dim, "dtype": str(dtype).split(".")[-1],
                "ours_kernel": "triton" if triton_applies(q) else "torch", "transformers": transformers is not None,
                "modes": {}}
        for mode, wrap in (("forward", forward), ("forward_backward", forward_backward)):
            passes = 1 if mode == "forward" else 2
            calls = {name: wrap(fn) for name, fn in functions.items()}
            timings = time_peers({**calls, "copy": copy(mode)}, device, rounds, min_sample_s)
            peers = {}
            for name, timing in timings.items():
                sides = 0 if name == "copy" else 2 if name.endswith("+xpos") else 1
                moved = passes * (data_bytes + sides * table_bytes)
                peers[name] = {**timing.as_dict(), "bytes": moved, "bytes_per_s": moved / timing.median}
                if peak:
                    peers[name]["fraction_of_peak_bandwidth"] = moved / timing.median / peak
            ratios = {}
            for name in functions:
                if not name.startswith("ours:"):
                    continue
                layout = name.split(":")[1].removesuffix("+xpos")
                ratios[name] = {"vs_reference": speedup(timings, name, f"reference:{layout}"),
                                "fraction_of_copy": speedup(timings, name, "copy")}
                if transformers is not None:
                    ratios[name]["vs_transformers"] = speedup(timings, name, "transformers")
                    ratios[name]["vs_transformers_apply"] = speedup(timings, name, "transformers-apply")
            plain = [timings[f"ours:{layout}"].median for layout in ROTARY_LAYOUTS]
            case["modes"][mode] = {"peers": peers, "ratios": ratios, "layout_spread": max(plain) / min(plain)}
        tables = time_peers({name: (lambda e=e: e.rotation(positions)) for name, e in encodings.items()
                             if name.startswith("ours:complex")}, device, rounds, min_sample_s)
        case["tables_s"] = {name: timing.median for name, timing in tables.items()}
        cases.append(case)
        print_case(case, peak is not None)
    return {"heads": HEADS, "xpos_scale_base": XPOS_SCALE_BASE, "peak_bandwidth": peak, "cases": cases}


def print_case(case: dict, with_peak: bool) -> None:
    for mode, result in case["modes"].items():
        header = ["peer", "ms", "GB/s", "vs hf-apply", "vs hf", "vs reference", "of copy"]
        if with_peak:
            header.append("of peak")
        rows = []
        for name, peer in result["peers"].items():
            ratio = result["ratios"].get(name, {})
            row = [name, peer["median_s"] * 1e3, peer["bytes_per_s"] / 1e9,
                   _times(ratio.get("vs_transformers_apply")), _times(ratio.get("vs_transformers")),
                   _times(ratio.get("vs_reference")), _times(ratio.get("fraction_of_copy"))]
            if with_peak:
                row.append(f"{peer['fraction_of_peak_bandwidth']:.0%}")
            rows.append(row)
        title = (f"rope {mode}: q and k ({case['batch']}, {case['heads']}, {case['seq']}, {case['head_dim']}) "
                 f"{case['dtype']}, our {case['ours_kernel']} kernels; layouts spread {result['layout_spread']:.2f}x")
        tables = ", ".join(f"{name.removeprefix('ours:')} {seconds * 1e3:.3f} ms"
                           for name, seconds in case["tables_s"].items())
        print_table(title, header, rows, ("vs X: times faster than X (median of per-round ratios); of copy: "
                                          "copy time / our time, the fraction of the attainable bandwidth",
                                          f"tables (built once per forward, not included above): {tables}"))


def _times(ratio) -> str | None:
    return None if ratio is None else f"{ratio['wall']:.2f}x"
