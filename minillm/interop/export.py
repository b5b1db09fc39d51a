"""Conversion to other ecosystems: HF transformers' LlamaForCausalLM."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch

from minillm.model.transformer import Transformer
from minillm.positions.rotary import RotaryEmbedding

if TYPE_CHECKING:  # transformers is the optional `interop` extra
    import transformers


def _import_transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError("minillm.export needs HF transformers: pip install minillm[interop] "
                          "(or pip install transformers)") from error
    return transformers


def _incompatible(setting: str, value, llama: str) -> ValueError:
    return ValueError(f"{setting}={value!r} is not LLaMA-compatible (LLaMA uses {llama})")


def _check_architecture(model: Transformer) -> RotaryEmbedding:
    """Raise on the first setting LlamaForCausalLM cannot express; the rotary encoding otherwise."""
    cfg = model.cfg
    if cfg.norm != "rmsnorm":
        raise _incompatible("model.norm", cfg.norm, "rmsnorm")
    if cfg.ffn != "swiglu":
        raise _incompatible("model.ffn", cfg.ffn, "swiglu")
    if cfg.bias or cfg.qkv_bias:
        setting = "model.bias" if cfg.bias else "model.qkv_bias"
        raise _incompatible(setting, True, "no biases")
    if cfg.qk_norm:
        raise _incompatible("model.qk_norm", cfg.qk_norm, "no QK-norm")
    if cfg.nope_every is not None:
        raise _incompatible("model.nope_every", cfg.nope_every, "rotary positions in every layer")
    if cfg.attn_temperature != "none":
        raise _incompatible("model.attn_temperature", cfg.attn_temperature, "no query temperature")
    # The encoding as built (evaluation reads a model with other scalings as data; it never swaps this module).
    position = model.position
    if not isinstance(position, RotaryEmbedding):
        raise _incompatible("rope.variant", cfg.rope.variant, "rotary")
    if position.xpos_scale_base is not None:
        raise _incompatible("rope.xpos_scale_base", position.xpos_scale_base, "plain rotary, no XPos")
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


def _rope_parameters(position: RotaryEmbedding, head_dim: int, context_length: int) -> tuple[dict, int]:
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
                         "is not LLaMA-compatible (HF LLaMA rotates part of a head only with plain, linear or "
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
    transformers = _import_transformers()
    position = _check_architecture(model)
    cfg = model.cfg
    head_dim = cfg.head_dim
    rope_params, max_positions = _rope_parameters(position, head_dim, cfg.context_length)
    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=head_dim, hidden_act="silu", rms_norm_eps=cfg.norm_eps, max_position_embeddings=max_positions,
        attention_bias=False, mlp_bias=False, attention_dropout=cfg.attn_dropout,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        attn_implementation=attn_implementation, **_rope_kwargs(transformers, rope_params))
    hf = transformers.LlamaForCausalLM(config)

    perm = rotary_permutation(position.variant, head_dim, position.rotary_dim)
    q_size, kv_size = cfg.n_heads * head_dim, cfg.kv_heads * head_dim
    state = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.head.weight}  # the same tensor as the embedding when tied
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split([q_size, kv_size, kv_size])
        gate, up = block.ffn.up.weight.chunk(2)  # fused rows: [gate | up]
        state.update({
            prefix + "self_attn.q_proj.weight": _permute_heads(q, cfg.n_heads, perm),
            prefix + "self_attn.k_proj.weight": _permute_heads(k, cfg.kv_heads, perm),
            prefix + "self_attn.v_proj.weight": v,
            prefix + "self_attn.o_proj.weight": block.attn.proj.weight,
            prefix + "input_layernorm.weight": block.attn_norm.weight,
            prefix + "post_attention_layernorm.weight": block.ffn_norm.weight,
            prefix + "mlp.gate_proj.weight": gate,
            prefix + "mlp.up_proj.weight": up,
            prefix + "mlp.down_proj.weight": block.ffn.down.weight,
        })
    # Copies (load_state_dict copies into HF's own parameters), in float32 whatever the model's dtype.
    hf.load_state_dict({name: t.detach().float() for name, t in state.items()}, strict=True)
    return hf.float().to(model.embed.weight.device).eval()
