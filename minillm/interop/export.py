"""Conversion to HF transformers: our Transformer as a LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM with
equal logits, and saved as a transformers folder with its tokenizer."""

from __future__ import annotations

import inspect
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from minillm.model.transformer import Transformer
from minillm.positions.rotary import RotaryEmbedding

if TYPE_CHECKING:  # transformers is the optional `interop` extra
    import tokenizers
    import transformers


def _import_transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError("minillm.export needs HF transformers: pip install minillm[interop] "
                          "(or pip install transformers)") from error
    return transformers


# HF family -> (its name in messages, config class, model class). Ours is each of them term for term; the family is
# the one whose attention has exactly our extras: Qwen2 biases q, k and v (not the output); Qwen3 normalizes each
# head's q and k (RMSNorm) before the rotation.
FAMILIES = {"llama": ("LLaMA", "LlamaConfig", "LlamaForCausalLM"),
            "qwen2": ("Qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
            "qwen3": ("Qwen3", "Qwen3Config", "Qwen3ForCausalLM")}


def hf_family(model: Transformer) -> str:
    """The transformers family that expresses `model`: qwen3 with QK-norm, qwen2 with q/k/v biases, else llama."""
    cfg = model.cfg
    if cfg.qkv_bias and cfg.qk_norm:  # Qwen3's attention_bias also biases the output projection; ours does not
        raise ValueError("model.qkv_bias=True with model.qk_norm=True has no transformers family (Qwen2 has the "
                         "biases without QK-norm, Qwen3 QK-norm without q/k/v-only biases)")
    return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"


def _incompatible(setting: str, value, family: str, expected: str) -> ValueError:
    label = FAMILIES[family][0]
    return ValueError(f"{setting}={value!r} is not {label}-compatible ({label} uses {expected})")


def _check_architecture(model: Transformer, family: str) -> RotaryEmbedding:
    """Raise on the first setting `family` cannot express; the rotary encoding otherwise."""
    cfg = model.cfg
    if cfg.norm != "rmsnorm":
        raise _incompatible("model.norm", cfg.norm, family, "rmsnorm")
    if cfg.ffn != "swiglu":
        raise _incompatible("model.ffn", cfg.ffn, family, "swiglu")
    if cfg.bias:
        raise _incompatible("model.bias", True, family, "no biases" if family != "qwen2" else "biases on q, k, v only")
    if cfg.qkv_bias != (family == "qwen2"):
        raise _incompatible("model.qkv_bias", cfg.qkv_bias, family,
                            "biases on q, k and v" if family == "qwen2" else "no biases")
    if cfg.qk_norm != (family == "qwen3"):
        raise _incompatible("model.qk_norm", cfg.qk_norm, family, "QK-norm" if family == "qwen3" else "no QK-norm")
    if cfg.nope_every is not None:
        raise _incompatible("model.nope_every", cfg.nope_every, family, "rotary positions in every layer")
    if cfg.attn_temperature != "none":
        raise _incompatible("model.attn_temperature", cfg.attn_temperature, family, "no query temperature")
    if cfg.window is not None:
        raise _incompatible("model.window", cfg.window, family, "full attention in every layer")
    if cfg.attn_gate != "none":
        raise _incompatible("model.attn_gate", cfg.attn_gate, family, "no gate on the attention output")
    # The encoding as built (evaluation reads a model with other scalings as data; it never swaps this module).
    position = model.position
    if not isinstance(position, RotaryEmbedding):
        raise _incompatible("rope.variant", cfg.rope.variant, family, "rotary")
    if position.xpos_scale_base is not None:
        raise _incompatible("rope.xpos_scale_base", position.xpos_scale_base, family, "plain rotary, no XPos")
    return position


# ----------------------------------------------------------------------------------------------
# Rotary layout. HF LLaMA rotates channel pairs (j, j + head_dim/2) of each head with frequency θ_j
# (`rotate_half`). Our pair i of the first rotary_dim channels is (i, i + rotary_dim/2) for rotate_half and
# (2i, 2i+1) for complex and interleaved. Reordering the q and k output channels of every head by one
# permutation leaves every q·k unchanged, so the permuted projections rotated HF's way give our scores.


def rotary_permutation(variant: str, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """perm (head_dim,): HF channel j of a head holds our channel perm[j].

    Full rotary: identity for rotate_half, [0, 2, ..., d-2, 1, 3, ..., d-1] for complex / interleaved.
    Partial rotary (HF's `proportional` RoPE: frequencies θ_0 .. θ_{r/2-1}, then zeros): our pair i goes to
    HF channels (i, i + head_dim/2); the head_dim − r unrotated channels fill the zero-frequency slots.
    """
    half = rotary_dim // 2
    pairs = torch.arange(half)
    if variant == "rotate_half":
        first, second = pairs, pairs + half
    else:  # complex, interleaved: adjacent pairs
        first, second = 2 * pairs, 2 * pairs + 1
    passthrough = torch.arange(rotary_dim, head_dim).chunk(2) if rotary_dim < head_dim else (pairs[:0], pairs[:0])
    return torch.cat((first, passthrough[0], second, passthrough[1]))


def _permute_heads(weight: torch.Tensor, heads: int, perm: torch.Tensor) -> torch.Tensor:
    """Reorder the output rows of a (heads·head_dim, d_model) projection within each head."""
    return weight.view(heads, -1, weight.shape[-1])[:, perm].reshape_as(weight)


# ----------------------------------------------------------------------------------------------
# Rotary frequencies -> HF rope parameters (names of transformers 5.x `rope_parameters`; 4.x takes the same
# dict, less rope_theta, as `rope_scaling`).


def _rope_parameters(position: RotaryEmbedding, head_dim: int, context_length: int,
                     label: str = "LLaMA") -> tuple[dict, int]:
    """HF `rope_parameters` reproducing the model's frequencies (each scaling states its own), and
    max_position_embeddings."""
    scaling, rotary_dim = position.scaling, position.rotary_dim
    params, max_positions = scaling.hf_parameters(position.theta, rotary_dim, context_length)
    if rotary_dim == head_dim:
        return params, max_positions
    if not scaling.partial_rotary_in_hf:
        # LLaMA rotates every channel; only HF's `proportional` type leaves some unrotated (zero
        # frequencies), and it has no yarn / llama3 / dynamic / longrope variant.
        raise ValueError(f"rope_scaling.type={scaling.name!r} with rope.rotary_dim={rotary_dim} < head_dim={head_dim} "
                         f"is not {label}-compatible (HF {label} rotates part of a head only with plain, linear or "
                         "NTK frequencies, through its 'proportional' RoPE type)")
    # `proportional` spaces the r/2 frequencies over head_dim: base'^(−2i/head_dim) = base^(−2i/r).
    base = params["rope_theta"] ** (head_dim / rotary_dim)
    if not base < torch.finfo(torch.float32).max:  # HF raises the base to its powers in float32
        raise ValueError(f"rope.rotary_dim={rotary_dim}: HF's partial rotary base theta^(head_dim/rotary_dim) "
                         f"= {base:g} overflows float32; use a larger rotary_dim or a smaller theta")
    partial = {"rope_type": "proportional", "rope_theta": base, "partial_rotary_factor": rotary_dim / head_dim}
    if "factor" in params:
        partial["factor"] = params["factor"]  # HF logs it as unrecognised, yet divides the frequencies by it
    return partial, max_positions


def _rope_kwargs(transformers, params: dict) -> dict:
    """LlamaConfig keyword arguments for `params`: `rope_parameters` (5.x) or `rope_theta` + `rope_scaling` (4.x)."""
    if "rope_parameters" in inspect.signature(transformers.LlamaConfig.__init__).parameters:
        return {"rope_parameters": params}
    if params["rope_type"] == "proportional":
        raise ValueError(f"rope.rotary_dim: partial rotary needs transformers>=5 (HF 'proportional' RoPE); "
                         f"this is transformers {transformers.__version__}")
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return {"rope_theta": params["rope_theta"], "rope_scaling": None if params["rope_type"] == "default" else scaling}


# ----------------------------------------------------------------------------------------------


def to_hf_llama(model: Transformer, attn_implementation: str = "sdpa") -> "transformers.LlamaForCausalLM":
    """A float32 LlamaForCausalLM in eval mode, on the model's device, whose logits equal `model`'s; raises
    ValueError naming the first setting LLaMA cannot express (layernorm, gelu, biases, QK-norm, non-rotary
    encodings, XPos, dynamic YaRN, which HF lacks, partial rotary with yarn / llama3 / dynamic NTK / LongRoPE).

    Deliberate omissions: dropout (inference only) and special-token ids (bos/eos/pad are left None; set
    them from the tokenizer). Dynamic NTK and LongRoPE match a forward over a whole sequence; HF's decoding
    differs, because HF caches rotated keys: dynamic NTK keeps the frequencies of the longest length seen so
    far, and LongRoPE's keys from before the sequence passed L0 stay rotated with the short factors.
    """
    return to_hf(model, attn_implementation, family="llama")


def to_hf(model: Transformer, attn_implementation: str = "sdpa", family: str | None = None):
    """`model` as the transformers family that expresses it (hf_family: Llama, Qwen2 with q/k/v biases, Qwen3
    with QK-norm), float32, eval mode, equal logits; what to_hf_llama says of LLaMA holds for each."""
    transformers = _import_transformers()
    family = hf_family(model) if family is None else family
    label, config_class, model_class = FAMILIES[family]
    position = _check_architecture(model, family)
    cfg = model.cfg
    head_dim = cfg.head_dim
    rope_params, max_positions = _rope_parameters(position, head_dim, cfg.context_length, label)
    extra = {"use_sliding_window": False} if family != "llama" else {"attention_bias": False, "mlp_bias": False}
    config = getattr(transformers, config_class)(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=head_dim, hidden_act="silu", rms_norm_eps=cfg.norm_eps, max_position_embeddings=max_positions,
        attention_dropout=cfg.attn_dropout, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None,
        eos_token_id=None, pad_token_id=None, attn_implementation=attn_implementation,
        **extra, **_rope_kwargs(transformers, rope_params))
    hf = getattr(transformers, model_class)(config)

    perm = rotary_permutation(position.variant, head_dim, position.rotary_dim)
    sizes = [cfg.n_heads * head_dim, cfg.kv_heads * head_dim, cfg.kv_heads * head_dim]
    state = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.head.weight}  # the same tensor as the embedding when tied
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}."
        attention = prefix + "self_attn."
        q, k, v = block.attn.qkv.weight.split(sizes)
        gate, up = block.ffn.up.weight.chunk(2)  # fused rows: [gate | up]
        state.update({
            attention + "q_proj.weight": _permute_heads(q, cfg.n_heads, perm),
            attention + "k_proj.weight": _permute_heads(k, cfg.kv_heads, perm),
            attention + "v_proj.weight": v,
            attention + "o_proj.weight": block.attn.proj.weight,
            prefix + "input_layernorm.weight": block.attn_norm.weight,
            prefix + "post_attention_layernorm.weight": block.ffn_norm.weight,
            prefix + "mlp.gate_proj.weight": gate,
            prefix + "mlp.up_proj.weight": up,
            prefix + "mlp.down_proj.weight": block.ffn.down.weight,
        })
        if cfg.qkv_bias:  # a bias is one more column of the projection: its entries move with the rows
            q_bias, k_bias, v_bias = block.attn.qkv.bias.split(sizes)
            state.update({attention + "q_proj.bias": _permute_heads(q_bias[:, None], cfg.n_heads, perm)[:, 0],
                          attention + "k_proj.bias": _permute_heads(k_bias[:, None], cfg.kv_heads, perm)[:, 0],
                          attention + "v_proj.bias": v_bias})
        if cfg.qk_norm:  # RMSNorm over a head is blind to the channels' order; its gains follow the permutation
            state.update({attention + "q_norm.weight": block.attn.q_norm.weight[perm],
                          attention + "k_norm.weight": block.attn.k_norm.weight[perm]})
    # Copies (load_state_dict copies into HF's own parameters), in float32 whatever the model's dtype.
    hf.load_state_dict({name: t.detach().float() for name, t in state.items()}, strict=True)
    return hf.float().to(model.embed.weight.device).eval()


# ----------------------------------------------------------------------------------------------
# A transformers folder: the model (config.json with the rope parameters, safetensors) and its tokenizer.


def hf_tokenizer(tokenizer: "tokenizers.Tokenizer", eos_token: str | None = None):
    """The tokenizer as transformers' PreTrainedTokenizerFast; eos_token (where the vocabulary has it) is its end
    of sequence and its padding, and nothing is prepended (minillm trains without a BOS)."""
    transformers = _import_transformers()
    special = {}
    if eos_token is not None and tokenizer.token_to_id(eos_token) is not None:
        special = {"eos_token": eos_token, "pad_token": eos_token}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)


def save_hf_folder(model: Transformer, tokenizer: "tokenizers.Tokenizer", out: Path,
                   eos_token: str | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """`model` (as to_hf builds it, its weights in dtype) and its tokenizer saved into the folder `out`, which
    AutoModelForCausalLM and AutoTokenizer load; every refusal comes before anything is written, and `out` is
    replaced whole or not at all."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} is a file: name a folder for format=hf")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ValueError(f"out={str(out)!r} is a folder with other files (no config.json): name a new folder")
    hf = to_hf(model).to(dtype)
    fast = hf_tokenizer(tokenizer, eos_token)
    if len(fast) > hf.config.vocab_size:
        raise ValueError(f"tokenizer.json: {len(fast)} tokens, more than the model's vocab_size={hf.config.vocab_size}")
    for settings in (hf.config, hf.generation_config):
        settings.eos_token_id = fast.eos_token_id
        settings.pad_token_id = fast.pad_token_id

    def fill(folder: Path) -> None:
        hf.save_pretrained(folder)
        fast.save_pretrained(folder)

    _write_folder(out, fill)
    return out


def _write_folder(out: Path, fill) -> None:
    """fill() a sibling folder, then swap it in for `out` (renames): a failure or a kill leaves `out` as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{os.getpid()}.partial")  # mkdir: the umask's permissions, not mkdtemp's 700
    aside = out.with_name(f".{out.name}.{os.getpid()}.old")
    shutil.rmtree(staging, ignore_errors=True)  # what a killed export of the same process id left
    staging.mkdir()
    try:
        fill(staging)
        if out.exists():
            os.replace(out, aside)
        os.replace(staging, out)
    except BaseException:
        if aside.exists() and not out.exists():
            os.replace(aside, out)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
