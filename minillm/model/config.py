"""The model's typed config: shape, encoding, norms, attention options, each checked by name."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from minillm.positions.base import ModelShape, position_config
from minillm.positions.rotary import RotaryConfig
from minillm.positions.scaling import Scaling, scaling_config
from minillm.registry import choice, finite, positive, require

# ----------------------------------------------------------------------------------------------
# The model (conf/model)

ATTENTION_GATES = ("none", "headwise", "elementwise")  # model.attn_gate: how many gates each head's output gets
WINDOW_LAYERS = ("positional", "all")  # model.window_layers: which layers the training window restricts
NOPE_LOGIT_SCALES = ("none", "swan")  # model.nope_logit_scale: a length factor on the position-free layers' logits


@dataclass
class ModelSettings:
    """What the model group (conf/model, model.*) sets: every model setting but the position encoding and its
    scaling, which the top-level rope and rope_scaling groups choose, one slot each."""

    vocab_size: int = 4096  # tokens in the vocabulary; a run takes its tokenizer's (tokenizer.vocab_size)
    context_length: int = 256  # the training sequence length; stored with checkpoints
    d_model: int = 128  # the residual stream's width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads per attention layer
    n_kv_heads: Optional[int] = None  # key/value heads; None: as many as n_heads (multi-head); fewer: grouped-query
    head_size: Optional[int] = None  # channels per head; None: d_model / n_heads (Qwen3 sets it apart)
    ffn: str = "swiglu"  # swiglu (LLaMA) | gelu (GPT-2)
    ffn_hidden: Optional[int] = None  # the feed-forward's width; None: 4*d_model (gelu), 8/3*d_model to 64 (swiglu)
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5  # added to the variance inside every norm, so that a zero vector divides by sqrt(eps)
    bias: bool = False  # biases in every linear layer and LayerNorm
    qkv_bias: bool = False  # biases on the query, key and value projections only (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before the rotation (arXiv:2302.05442; Qwen3)
    nope_every: Optional[int] = None  # every n-th layer (n, 2n, ...) sees no positions (Llama 4's iRoPE); None: none
    attn_temperature: str = "none"  # none | logn (Qwen's log-n) | ssmax (Scalable-Softmax): queries scaled by position
    # none | headwise (a scalar per head) | elementwise (one per channel): a sigmoid gate from the layer input on
    # the attention output (Qiu et al. 2025, arXiv:2505.06708)
    attn_gate: str = "none"
    # Sliding-window attention at training and evaluation alike: each query of a windowed layer sees its last `window`
    # keys, itself included (the `sliding` method's convention); None: every causal key (RNoPE-SWA, arXiv:2501.18795)
    window: Optional[int] = None
    # positional: the layers that see positions (all but nope_every's, which keep full attention: RNoPE-SWA, SWAN-GPT
    # arXiv:2504.08719) | all: every layer (plain SWA, Mistral's)
    window_layers: str = "positional"
    # none | swan: the position-free layers' queries × max(1, 1 + α·ln(n/L)), n the keys a query sees (SWAN-GPT)
    nope_logit_scale: str = "none"
    nope_logit_alpha: Optional[float] = None  # α of nope_logit_scale=swan; None: 1/ln L, i.e. max(1, log_L n)
    tie_embeddings: bool = True  # the output head shares the token embedding matrix
    attn_dropout: float = 0.0  # dropout on the attention probabilities, in [0, 1)
    resid_dropout: float = 0.0  # dropout on each block's output before it joins the residual stream, in [0, 1)
    init_std: float = 0.02  # std of the normal init of embeddings and linear layers (output projections: ÷√(2L))


@dataclass
class ModelConfig(ModelSettings):
    """The decoder-only transformer with its position encoding and scaling: what builds a Transformer and what a
    checkpoint stores (plain types, to_dict)."""

    rope: Any = field(default_factory=RotaryConfig)  # a registered PositionConfig (minillm.positions)
    rope_scaling: Any = field(default_factory=Scaling)  # a registered Scaling (minillm.positions.scaling)

    @classmethod
    def of(cls, settings: ModelSettings, rope: Any, rope_scaling: Any) -> "ModelConfig":
        """The model of `settings` with this encoding and scaling (the run's rope and rope_scaling groups)."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(ModelSettings)}, rope=rope,
                   rope_scaling=rope_scaling)

    def __post_init__(self) -> None:
        # Hydra hands nested configs over as DictConfig or dict; normalise to the dataclasses.
        self.rope = position_config(self.rope)
        self.rope_scaling = scaling_config(self.rope_scaling)
        if self.rope_scaling.name != "none":  # the trained length, resolved here once: the model's own unless given
            self.rope_scaling = self.rope_scaling.trained_at(self.context_length)
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads"):
            require(getattr(self, name) > 0, f"model.{name}", f"must be positive, got {getattr(self, name)}")
        if self.head_size is None:
            require(self.d_model % self.n_heads == 0, "model.n_heads",
                     f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        else:
            require(self.head_size > 0, "model.head_size", f"must be positive, got {self.head_size}")
        require(self.kv_heads > 0 and self.n_heads % self.kv_heads == 0, "model.n_kv_heads",
                 f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        choice(self.ffn, "model.ffn", ("swiglu", "gelu"))
        choice(self.norm, "model.norm", ("rmsnorm", "layernorm"))
        if self.ffn_hidden is not None:
            require(self.ffn_hidden > 0, "model.ffn_hidden", f"must be positive, got {self.ffn_hidden}")
        for name in ("attn_dropout", "resid_dropout"):
            require(0.0 <= getattr(self, name) < 1.0, f"model.{name}", f"must be in [0, 1), got {getattr(self, name)}")
        positive(self.norm_eps, "model.norm_eps")  # inf: every activation normed to 0, a constant predictor
        positive(self.init_std, "model.init_std")
        choice(self.attn_temperature, "model.attn_temperature", ("none", "logn", "ssmax"))
        choice(self.attn_gate, "model.attn_gate", ATTENTION_GATES)
        require(self.attn_temperature == "none" or self.context_length >= 2, "model.attn_temperature",
                 f"scales by log_L with L = model.context_length, which must be at least 2 (got {self.context_length})")
        if self.nope_every is not None:
            require(self.nope_every >= 1, "model.nope_every", f"must be at least 1, got {self.nope_every}")
            require(not self.rope.absolute, "model.nope_every",
                     f"position-free layers need a per-layer encoding (rotary or a bias); {self.rope.variant!r} "
                     f"adds positions to the token embeddings, which every layer then sees")
        self._check_windows()
        finite(self, "model")
        self.rope.validate(self.shape, self.rope_scaling)

    def _check_windows(self) -> None:
        """The window and the NoPE layers' logit scale, each checked by name."""
        choice(self.window_layers, "model.window_layers", WINDOW_LAYERS)
        choice(self.nope_logit_scale, "model.nope_logit_scale", NOPE_LOGIT_SCALES)
        if self.window is not None:
            require(1 <= self.window < self.context_length, "model.window",
                     f"must lie in [1, {self.context_length}) (below model.context_length, else every training query "
                     f"sees all its keys; a window only at evaluation is attention=sliding), got {self.window}")
            require(any(self.windowed(layer) for layer in range(self.n_layers)), "model.window",
                     f"no layer to window: model.window_layers=positional windows the layers that see positions, and "
                     f"model.nope_every={self.nope_every} leaves none")
        if self.nope_logit_scale != "none":
            require(any(self.position_free(layer) for layer in range(self.n_layers)), "model.nope_logit_scale",
                     "scales the position-free layers' logits; model.nope_every sets none")
            require(self.attn_temperature == "none", "model.nope_logit_scale",
                     f"model.attn_temperature={self.attn_temperature!r} already scales every query by its position")
            require(self.context_length >= 2, "model.nope_logit_scale",
                     f"scales by ln(n/L) with L = model.context_length, which must be at least 2 (got {self.context_length})")
        if self.nope_logit_alpha is not None:
            positive(self.nope_logit_alpha, "model.nope_logit_alpha")
            require(self.nope_logit_scale == "swan", "model.nope_logit_alpha", "only model.nope_logit_scale=swan reads it")

    @property
    def shape(self) -> ModelShape:
        """What the position encoding is told of the model."""
        return ModelShape(self.d_model, self.n_heads, self.head_dim, self.context_length, self.init_std,
                          tuple(layer for layer in range(self.n_layers) if not self.position_free(layer)))

    @property
    def label(self) -> str:
        """A short name for what a model was trained with: 'complex θ=1e+04', 'xpos(complex) γ=512', 'alibi', ..."""
        nope = f" nope/{self.nope_every}" if self.nope_every is not None else ""
        temperature = f" {self.attn_temperature}" if self.attn_temperature != "none" else ""
        gate = f" gate={self.attn_gate}" if self.attn_gate != "none" else ""
        window = "" if self.window is None else f" swa/{self.window}" + (" all" if self.window_layers == "all" else "")
        scale = f" {self.nope_logit_scale}" if self.nope_logit_scale != "none" else ""
        return self.rope.label + self.rope_scaling.label + nope + temperature + gate + window + scale

    def position_free(self, layer: int) -> bool:
        """Whether layer (0-based) is one of the nope_every-th layers, which see no positions."""
        return self.nope_every is not None and (layer + 1) % self.nope_every == 0

    def windowed(self, layer: int) -> bool:
        """Whether layer (0-based) attends through the training window (model.window, model.window_layers)."""
        return self.window is not None and (self.window_layers == "all" or not self.position_free(layer))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads if self.head_size is None else self.head_size

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.ffn == "gelu":
            return 4 * self.d_model
        return 64 * math.ceil(8 * self.d_model / 3 / 64)  # LLaMA: 2/3 of 4d, rounded up to 64

    def to_dict(self) -> dict:
        """Plain types only, so checkpoints load with torch.load(weights_only=True)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"model config: unknown field(s) {unknown}; known fields are {sorted(names)}")
        return cls(**d)
