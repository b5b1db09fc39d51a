"""Import of pretrained causal LMs (a transformers folder or hub id, or a GGUF file) into minillm's Transformer."""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from minillm.model.config import ModelConfig
from minillm.model.transformer import Transformer
from minillm.positions.rotary import RotaryConfig
from minillm.positions.scaling import (
    DynamicNTKScaling,
    LinearScaling,
    Llama3Scaling,
    LongRopeScaling,
    Scaling,
    YarnScaling,
)
from minillm.runs import CheckpointError, load_failure, non_finite

if TYPE_CHECKING:  # transformers is the optional `interop` extra
    import tokenizers

HF_PREFIX = "hf:"
# The families whose decoder is ours term for term: pre-norm RMSNorm, SwiGLU, rotary (HF's rotate_half pairs,
# (i, i + d/2)), grouped-query attention; Qwen2 adds biases to q, k and v, Qwen3 an RMSNorm over each head's q, k.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
GGUF_MAGIC = b"GGUF"


class UnsupportedModel(ValueError):
    """A pretrained config this import cannot express; the message names the field."""


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError("importing pretrained models needs HF transformers: pip install minillm[interop] "
                          "(and minillm[real] for GGUF files: gguf, accelerate)") from error
    from huggingface_hub.utils import are_progress_bars_disabled

    if are_progress_bars_disabled():  # transformers reads the switch once, at its import
        transformers.utils.logging.disable_progress_bar()
    return transformers


# ----------------------------------------------------------------------------------------------
# Config: an HF config -> ModelConfig, every field the decoder reads mapped or refused by name.


def _refuse(hf, field: str, value: Any, expected: str) -> UnsupportedModel:
    return UnsupportedModel(f"{field}={value!r} in this {hf.model_type} config is not supported "
                            f"(minillm imports {expected})")


def rope_parameters(hf) -> dict:
    """The config's RoPE settings as one dict with `rope_type` and `rope_theta` (transformers 5's
    `rope_parameters`; 4.x keeps `rope_theta` apart and the scaling, typed `type` or `rope_type`, in `rope_scaling`)."""
    params = getattr(hf, "rope_parameters", None)
    if params is None:
        scaling = dict(getattr(hf, "rope_scaling", None) or {})
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        params = {"rope_type": "default", "rope_theta": getattr(hf, "rope_theta", 10000.0), **scaling}
    params = dict(params)
    if "rope_type" not in params:  # per-layer-type parameters (Gemma 3 and friends): not one decoder
        raise _refuse(hf, "rope_parameters", sorted(params), "one set of rotary parameters for every layer")
    return params


def rope_settings(hf, params: dict) -> tuple[RotaryConfig, Scaling, int]:
    """(encoding, scaling, trained length) reproducing HF's frequencies for `params` (HF modeling_rope_utils).

    The trained length is the pretraining context the scaling extends: original_max_position_embeddings where
    the type has one, else max_position_embeddings (which HF's dynamic NTK also takes as its L0)."""
    max_positions = int(hf.max_position_embeddings)
    kind, theta = params["rope_type"], float(params["rope_theta"])
    if params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0)) not in (None, 1, 1.0):
        raise _refuse(hf, "partial_rotary_factor", params.get("partial_rotary_factor"), "rotary over whole heads")
    original = params.get("original_max_position_embeddings")
    original = int(original) if original is not None else None
    rope = RotaryConfig(variant="rotate_half", theta=theta)
    if kind == "default":
        return rope, Scaling(), max_positions
    if kind == "linear":
        return rope, LinearScaling(factor=float(params["factor"])), max_positions
    if kind == "dynamic":
        return rope, DynamicNTKScaling(factor=float(params["factor"]), original_max_position=max_positions), \
            max_positions
    if original is None:
        raise _refuse(hf, "rope_parameters.original_max_position_embeddings", None,
                      f"{kind} RoPE with the pretraining length it extends")
    factor = params.get("factor")
    factor = float(factor) if factor is not None else max_positions / original  # HF's fallback (DeepSeek, Phi-3)
    if kind == "yarn":
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if not (mscale and mscale_all_dim):  # HF reads them only as a pair; either alone changes nothing
            mscale = mscale_all_dim = None
        scaling = YarnScaling(factor=factor, original_max_position=original,
                              beta_fast=float(params.get("beta_fast") or 32.0),
                              beta_slow=float(params.get("beta_slow") or 1.0),
                              attention_factor=_float(params.get("attention_factor")), mscale=_float(mscale),
                              mscale_all_dim=_float(mscale_all_dim), truncate=bool(params.get("truncate", True)))
    elif kind == "llama3":
        scaling = Llama3Scaling(factor=factor, original_max_position=original,
                                low_freq_factor=float(params["low_freq_factor"]),
                                high_freq_factor=float(params["high_freq_factor"]))
    elif kind == "longrope":
        scaling = LongRopeScaling(factor=factor, original_max_position=original,
                                  short_factor=[float(x) for x in params["short_factor"]],
                                  long_factor=[float(x) for x in params["long_factor"]],
                                  attention_factor=_float(params.get("attention_factor")))
    else:
        raise _refuse(hf, "rope_parameters.rope_type", kind,
                      "default, linear, dynamic, yarn, llama3 or longrope RoPE")
    return rope, scaling, original


def _float(value) -> Optional[float]:
    return None if value is None else float(value)


def model_config(hf) -> ModelConfig:
    """The ModelConfig of an HF config (LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config); UnsupportedModel
    naming the first field whose value our decoder does not compute."""
    kind = getattr(hf, "model_type", None)
    if kind not in FAMILIES:
        raise UnsupportedModel(f"model_type={kind!r} is not supported (minillm imports {', '.join(FAMILIES)})")
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise _refuse(hf, "hidden_act", hf.hidden_act, "SwiGLU feed-forwards (silu)")
    if kind in ("llama", "qwen3") and getattr(hf, "attention_bias", False):
        raise _refuse(hf, "attention_bias", True, "attention without an output bias")
    if getattr(hf, "mlp_bias", False):
        raise _refuse(hf, "mlp_bias", True, "feed-forwards without biases")
    if kind == "mistral" and getattr(hf, "sliding_window", None) is not None:
        raise _refuse(hf, "sliding_window", hf.sliding_window, "full causal attention (sliding_window=null)")
    if kind in ("qwen2", "qwen3") and getattr(hf, "use_sliding_window", False):
        raise _refuse(hf, "use_sliding_window", True, "full causal attention")
    layer_types = getattr(hf, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise _refuse(hf, "layer_types", sorted(set(layer_types)), "full attention in every layer")
    heads = int(hf.num_attention_heads)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    rope, scaling, trained = rope_settings(hf, rope_parameters(hf))
    return ModelConfig(
        vocab_size=int(hf.vocab_size), context_length=trained, d_model=int(hf.hidden_size),
        n_layers=int(hf.num_hidden_layers), n_heads=heads, n_kv_heads=int(hf.num_key_value_heads or heads),
        head_size=None if head_dim * heads == hf.hidden_size else int(head_dim),
        ffn="swiglu", ffn_hidden=int(hf.intermediate_size), norm="rmsnorm", norm_eps=float(hf.rms_norm_eps),
        qkv_bias=kind == "qwen2", qk_norm=kind == "qwen3", tie_embeddings=bool(hf.tie_word_embeddings),
        rope=rope, rope_scaling=scaling)


# ----------------------------------------------------------------------------------------------
# Weights: HF's per-projection tensors -> our fused ones (qkv = [q | k | v], up = [gate | up]).


@torch.no_grad()
def from_hf(hf_model, cfg: Optional[ModelConfig] = None) -> Transformer:
    """Our Transformer (float32, eval mode) holding an HF causal LM's weights; its logits equal the HF model's.

    The HF model is consumed: our model is built without storage (meta) and takes the HF tensors themselves,
    and the fused projections (qkv = [q | k | v], up = [gate | up]) are concatenated one layer at a time while
    their parts are released, so the import holds one copy of the weights and one layer's fusion on top."""
    cfg = model_config(hf_model.config) if cfg is None else cfg
    with torch.device("meta"):
        model = Transformer(cfg)
    model.position = cfg.rope.build(cfg.shape, cfg.rope_scaling)  # its tables, computed on the CPU
    weights = dict(hf_model.named_parameters())

    def take(name: str) -> torch.Tensor:
        if name not in weights:
            raise UnsupportedModel(f"{name}: expected in a {hf_model.config.model_type} checkpoint, not found")
        return weights[name].detach().float()

    def release(*names: str) -> None:  # the HF parameters just fused: their storage goes with them
        for name in names:
            owner, attribute = name.rsplit(".", 1)
            setattr(hf_model.get_submodule(owner), attribute, torch.nn.Parameter(torch.empty(0)))
            weights.pop(name)

    def put(module: torch.nn.Module, attribute: str, tensor: torch.Tensor, name: str) -> None:
        expected = getattr(module, attribute).shape
        if tensor.shape != expected:
            raise UnsupportedModel(f"{name}: shape {tuple(tensor.shape)}, the config implies {tuple(expected)}")
        setattr(module, attribute, torch.nn.Parameter(tensor, requires_grad=False))

    def fused(module: torch.nn.Module, attribute: str, names: list[str], label: str) -> None:
        put(module, attribute, torch.cat([take(n) for n in names]), label)
        release(*names)

    put(model.embed, "weight", take("model.embed_tokens.weight"), "model.embed_tokens.weight")
    put(model.norm, "weight", take("model.norm.weight"), "model.norm.weight")
    if cfg.tie_embeddings:
        model.head.weight = model.embed.weight
    else:
        put(model.head, "weight", take("lm_head.weight"), "lm_head.weight")
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}."
        attention, mlp = prefix + "self_attn.", prefix + "mlp."
        fused(block.attn.qkv, "weight", [attention + f"{p}_proj.weight" for p in "qkv"], attention + "{q,k,v}_proj.weight")
        if cfg.qkv_bias:
            fused(block.attn.qkv, "bias", [attention + f"{p}_proj.bias" for p in "qkv"], attention + "{q,k,v}_proj.bias")
        if cfg.qk_norm:
            put(block.attn.q_norm, "weight", take(attention + "q_norm.weight"), attention + "q_norm.weight")
            put(block.attn.k_norm, "weight", take(attention + "k_norm.weight"), attention + "k_norm.weight")
        put(block.attn.proj, "weight", take(attention + "o_proj.weight"), attention + "o_proj.weight")
        put(block.attn_norm, "weight", take(prefix + "input_layernorm.weight"), prefix + "input_layernorm.weight")
        put(block.ffn_norm, "weight", take(prefix + "post_attention_layernorm.weight"),
            prefix + "post_attention_layernorm.weight")
        fused(block.ffn.up, "weight", [mlp + "gate_proj.weight", mlp + "up_proj.weight"], mlp + "{gate,up}_proj.weight")
        put(block.ffn.down, "weight", take(mlp + "down_proj.weight"), mlp + "down_proj.weight")
    left = [name for name, p in model.named_parameters() if p.is_meta] + \
        [name for name, b in model.named_buffers() if b.is_meta]
    if left:
        raise UnsupportedModel(f"{left[0]}: no weight for it in the {hf_model.config.model_type} checkpoint")
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Sources: ckpt=hf:<folder or hub id> and ckpt=<file>.gguf.


def is_pretrained(ckpt: str) -> bool:
    """Whether an evaluation's ckpt entry names a model to import rather than one of our runs."""
    return str(ckpt).startswith(HF_PREFIX) or str(ckpt).lower().endswith(".gguf")


@dataclass
class Pretrained:
    """An imported model with its tokenizer."""

    model: Transformer
    tokenizer: "tokenizers.Tokenizer"
    source: "PretrainedSource"


@dataclass
class PretrainedSource:
    """A pretrained model on disk or on the hub: `location` is a folder or hub id, or a .gguf file."""

    location: str
    gguf: bool
    _hf_config: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def parse(cls, ckpt: str) -> "PretrainedSource":
        ckpt = str(ckpt)
        if ckpt.startswith(HF_PREFIX):
            location = ckpt[len(HF_PREFIX):]
            if not location:
                raise CheckpointError("ckpt=hf:: name a transformers folder or hub id after hf:")
            gguf = location.lower().endswith(".gguf")
        else:
            location, gguf = ckpt, True
        source = cls(location, gguf)
        source._check_files()
        return source

    @property
    def path(self) -> Path:
        return Path(self.location).expanduser()

    @property
    def local(self) -> bool:
        """A folder or file here; otherwise a hub id (read from the hub, or its cache when offline)."""
        return self.gguf or self.path.exists() or self.location.startswith((".", "/", "~"))

    @property
    def name(self) -> str:
        """How reports name it: the file's stem or the folder's name ('SmolLM2-135M-Instruct.Q4_1')."""
        return self.path.stem if self.gguf else (self.path.name if self.local else self.location)

    def describe(self) -> str:
        return str(self.path) if self.local else f"hub model {self.location}"

    def _check_files(self) -> None:
        """Missing, empty or foreign files: one line naming the file, before transformers reads anything."""
        if not self.local:
            return
        if not self.path.exists():
            raise CheckpointError(f"ckpt: {self.path} does not exist")
        if self.gguf:
            if not self.path.is_file():
                raise CheckpointError(f"ckpt: {self.path} is not a file")
            _check_gguf(self.path)
            return
        if not self.path.is_dir():
            raise CheckpointError(f"ckpt: {self.path} is not a transformers folder (name a folder with "
                                  f"config.json, or a .gguf file)")
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"ckpt: {self.path} has no config.json (not a transformers checkpoint folder)")
        weights = self.weight_files()
        if not weights:
            raise CheckpointError(f"ckpt: {self.path} has no *.safetensors weights")
        for file in weights:
            if file.suffix == ".safetensors":
                _check_safetensors(file)

    def weight_files(self) -> list[Path]:
        """The files the weights are read from: the GGUF file, or the folder's (a hub id's cached snapshot's)
        *.safetensors, else its *.bin."""
        if self.gguf:
            return [self.path]
        if self.local:
            folder = self.path
        else:  # read after load(): the files it fetched are in the hub's cache
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(self.location, local_files_only=True))
        return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))

    def _from_pretrained_args(self) -> tuple[str, dict]:
        if self.gguf:
            return str(self.path.parent), {"gguf_file": self.path.name}
        return str(self.path) if self.local else self.location, {}

    def hf_config(self):
        """transformers' config of the model (read once: a GGUF file is parsed whole to get it)."""
        if self._hf_config is None:
            self._hf_config = self._read_hf_config()
        return self._hf_config

    def _read_hf_config(self):
        transformers = _transformers()
        where, kwargs = self._from_pretrained_args()
        try:
            return transformers.AutoConfig.from_pretrained(where, **kwargs)
        except Exception as error:  # a malformed config.json: transformers' validators raise their own kinds
            raise CheckpointError(f"ckpt: the config of {self.describe()} could not be read "
                                  f"({load_failure(_innermost(error))})") from error

    def config(self, trained_length: Optional[int] = None) -> ModelConfig:
        """Our model config for it, from its config alone (no weights read); trained_length replaces the
        pretraining length read from the config (what 1x means, and what scalings extend by default)."""
        hf = self.hf_config()
        try:
            cfg = model_config(hf)
        except (ValueError, TypeError) as error:  # UnsupportedModel, ModelConfig's checks, a value of another type
            raise UnsupportedModel(f"ckpt: {self.describe()}: {str(error).splitlines()[0]}") from error
        return cfg if trained_length is None else dataclasses.replace(cfg, context_length=trained_length)

    def load(self, trained_length: Optional[int] = None) -> Pretrained:
        """The model in float32 and its tokenizer; quantized GGUF tensors are dequantized by transformers."""
        transformers = _transformers()
        where, kwargs = self._from_pretrained_args()
        cfg = self.config(trained_length)
        try:
            hf = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError, AttributeError, TypeError, struct.error) as error:
            raise CheckpointError(f"ckpt: the weights of {self.describe()} could not be read "
                                  f"({load_failure(error)})") from error
        tokenizer = self.tokenizer()
        if tokenizer.get_vocab_size() > cfg.vocab_size:
            raise CheckpointError(f"ckpt: the tokenizer of {self.describe()} has {tokenizer.get_vocab_size()} "
                                  f"tokens, more than the model's vocab_size={cfg.vocab_size}")
        try:
            model = from_hf(hf, cfg)  # consumes hf's tensors
        finally:
            del hf
        if (problem := non_finite(model.state_dict())) is not None:  # NaN weights measure nothing: say so
            raise CheckpointError(f"ckpt: the weights of {self.describe()} are not all finite: {problem}")
        return Pretrained(model, tokenizer, self)

    def tokenizer(self) -> "tokenizers.Tokenizer":
        """The model's own tokenizer, as a `tokenizers.Tokenizer` (what the evaluation encodes with)."""
        transformers = _transformers()
        where, kwargs = self._from_pretrained_args()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(where, **kwargs)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"ckpt: the tokenizer of {self.describe()} could not be read "
                                  f"({load_failure(error)})") from error
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise CheckpointError(f"ckpt: {self.describe()} has no fast (tokenizers) tokenizer; minillm reads "
                                  f"text with a tokenizer.json")
        return backend


def _innermost(error: BaseException) -> BaseException:
    """The cause at the end of an error's chain: transformers' validators wrap the sentence that names the field
    ("Field 'num_attention_heads' expected int, got str") in one that only says validation failed."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def load_pretrained(source: str, trained_length: Optional[int] = None) -> Pretrained:
    """Import `source`: 'hf:<folder or hub id>', '<folder>' with a config.json, or '<file>.gguf'."""
    if not is_pretrained(source) and Path(source).expanduser().is_dir():
        source = HF_PREFIX + source
    return PretrainedSource.parse(source).load(trained_length)


def _check_gguf(file: Path) -> None:
    """A GGUF file that is foreign, or whose header or tensors run past its end, names itself. gguf's reader
    maps the file and views every tensor in it, so this reads the header only."""
    with open(file, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise CheckpointError(f"ckpt: {file} is not a GGUF file (it does not start with b'GGUF')")
    try:
        import gguf
    except ImportError as error:
        raise ImportError("reading GGUF files needs the gguf package: pip install minillm[real] "
                          "(or pip install gguf accelerate)") from error
    try:
        gguf.GGUFReader(file)
    except Exception as error:  # the reader raises whatever numpy or struct does on short or garbled bytes
        raise CheckpointError(f"ckpt: {file} is corrupt or truncated ({load_failure(error)})") from error


def _check_safetensors(file: Path) -> None:
    """A safetensors file whose header or tensors run past its end (a truncated download) names itself."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        start = handle.read(8)
        header_size = struct.unpack("<Q", start)[0] if len(start) == 8 else size
        if 8 + header_size > size:
            raise CheckpointError(f"ckpt: {file} is truncated: {size} bytes, its header alone claims "
                                  f"{8 + header_size}")
        raw = handle.read(header_size)
    try:
        header = json.loads(raw)
    except (struct.error, ValueError, UnicodeDecodeError, MemoryError, OverflowError) as error:
        raise CheckpointError(f"ckpt: {file} is corrupt or truncated (its safetensors header does not parse: "
                              f"{load_failure(error)})") from error
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_size + end > size:
        raise CheckpointError(f"ckpt: {file} is truncated: {size} bytes, its header describes "
                              f"{8 + header_size + end}")


def weight_bytes(model: Transformer) -> int:
    """The bytes of one copy of the model's weights (tied ones counted once)."""
    return sum({p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}.values())
