"""The decoder-only transformer: norms, attention, feed-forward, blocks, KV cache and generation (plain torch)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.kernels import linear_cross_entropy, rms_norm, split_linear
from minillm.model.config import ModelConfig
from minillm.model.masks import (
    MASK_BUDGET,
    NO_POSITIONS,
    PATTERN_ROWS,
    Allowed,
    AttentionPlan,
    BlockedMask,
    ScoreSet,
    contextual_attention,
    mask_rows,
    merged_attention,
    with_input_bias,
    within,
)
from minillm.positions.base import PositionEncoding, Positions
from minillm.positions.methods import Window, check_encoding
from minillm.registry import require

if TYPE_CHECKING:
    from minillm.positions.methods import AttentionMethod
    from minillm.positions.scaling import Scaling


def project(layer: nn.Module, x: Tensor, sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
    """layer(x) split into `sizes` along the last dim: a plain Linear by split_linear's one fused matmul, any other
    layer (a LoRA-wrapped one, minillm.train.lora) called, so that what it adds to the weight is not skipped."""
    if type(layer) is nn.Linear:
        return split_linear(x, layer.weight, layer.bias, sizes)
    return layer(x).split(sizes, dim=-1)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · g (Zhang & Sennrich 2019, arXiv:1910.07467), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


class KVCache:
    """Keys (before rotation) and values of every layer, for incremental decoding.

    Keys are cached unrotated and rotated again at each step with the positions of the whole sequence
    (one elementwise pass over the cache, the same order as attention itself): XPos centres its scales
    on the current length, and dynamic NTK picks its frequencies from it, so rotated keys would go stale.
    Decoding therefore equals the full forward, to float tolerance, for every encoding whose rotation
    depends on positions only.

    Dynamic NTK past the trained length is the exception. Step t rotates every cached key with the
    frequencies for length t + 1, so in a one-layer model it equals the last logit of the full forward
    over the first t + 1 tokens. Deeper layers' keys and values are functions of the earlier tokens'
    hidden states, which were computed, and cached, at those tokens' own lengths; recomputing them
    would cost the full forward a cache exists to avoid. (HF transformers caches rotated keys: staler.)

    A bias that reads the layer's input (FoX) keeps its running sums c of the cached tokens (see update_sums).
    """

    def __init__(self, n_layers: int):
        self.keys: list[Optional[Tensor]] = [None] * n_layers
        self.values: list[Optional[Tensor]] = [None] * n_layers
        self.sums: list[Optional[Tensor]] = [None] * n_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[-1] is None else self.keys[-1].shape[-2]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=-2)
            v = torch.cat((self.values[layer], v), dim=-2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def update_sums(self, layer: int, sums: Tensor) -> Tensor:
        """The running sums (batch, heads, new) of the new tokens' increments continued from the cached tokens' last
        and appended: those of every key."""
        if self.sums[layer] is not None:
            sums = torch.cat((self.sums[layer], self.sums[layer][..., -1:] + sums), dim=-1)
        self.sums[layer] = sums
        return sums


def log_n_scale(query_positions: Tensor, trained_length: int) -> Tensor:
    """max(1, log_L(m + 1)) for queries at positions m (batch or 1, q_len) -> (batch or 1, 1, q_len, 1) float32:
    Qwen's log-n attention, 1 up to the training length L."""
    return (torch.log1p(query_positions.float())[:, None, :, None] / math.log(trained_length)).clamp(min=1.0)


def swan_scale(q_len: int, k_len: int, trained_length: int, alpha: Optional[float], device: torch.device) -> Tensor:
    """max(1, 1 + α·ln(n/L)) for the last q_len of k_len tokens -> (1, 1, q_len, 1) float32, n = k_len − q_len + r + 1
    the keys causal attention shows query row r (tokens, not positions: a NoPE layer reads none): SWAN-GPT's log scaling
    of the NoPE layers' logits (arXiv:2504.08719), 1 up to the training length L, so training never sees it.
    α = 1/ln L (None) gives max(1, log_L n), Qwen's log-n on those layers alone."""
    seen = torch.arange(k_len - q_len + 1, k_len + 1, device=device, dtype=torch.float32)
    alpha = 1 / math.log(trained_length) if alpha is None else alpha
    return (1 + alpha * torch.log(seen / trained_length)).clamp(min=1.0)[None, None, :, None]


class QueryTemperature(nn.Module):
    """A factor on each query by its position m, so that attention stays as sharp past the training length L as
    within it (scores scale with q):
        logn   max(1, log_L(m + 1)), Qwen's log-n attention (1 up to the training length);
        ssmax  s_h · log(m + 1), Scalable-Softmax (Nakanishi 2025, arXiv:2501.19399): log n for a query that
               sees n keys, times a learned s per head, initialised to 1/log L (a factor of 1 at the training length).
    """

    def __init__(self, kind: str, n_heads: int, trained_length: int):
        super().__init__()
        self.kind, self.trained_length = kind, trained_length
        if kind == "ssmax":
            self.s = nn.Parameter(torch.full((n_heads,), 1 / math.log(trained_length)))

    def forward(self, query_positions: Tensor) -> Tensor:
        """(batch or 1, q_len) positions -> (batch or 1, heads or 1, q_len, 1) float32 factors."""
        if self.kind == "logn":
            return log_n_scale(query_positions, self.trained_length)
        return torch.log1p(query_positions.float())[:, None, :, None] * self.s.float()[None, :, None, None]


class Attention(nn.Module):
    """Causal self-attention: fused qkv projection, grouped-query heads, optional QK-norm, query temperature and
    output gate, SDPA."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim,
                             bias=cfg.bias or cfg.qkv_bias)
        self.qkv_sizes = (cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim)
        self.proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        # QK-norm (Dehghani et al. 2023, arXiv:2302.05442; Qwen3, OLMo 2): RMSNorm over each head's channels keeps
        # attention logits bounded.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.dropout = cfg.attn_dropout
        self.temperature = None if cfg.attn_temperature == "none" else \
            QueryTemperature(cfg.attn_temperature, cfg.n_heads, cfg.context_length)
        # Gated attention (Qiu et al. 2025, arXiv:2505.06708, their best variant G1): Y' = Y ⊙ σ(X W_g + b), X the
        # layer's normed input that q, k, v read, Y each head's attention output before the output projection;
        # one gate per head (headwise) or per channel (elementwise). Initialised as every linear layer (normal,
        # init_std; bias 0), as Qwen3-Next's gate rows of q_proj are: every gate starts near σ(0) = 1/2.
        gates = {"none": 0, "headwise": cfg.n_heads, "elementwise": cfg.n_heads * cfg.head_dim}[cfg.attn_gate]
        self.gate = nn.Linear(cfg.d_model, gates, bias=cfg.bias) if gates else None

    def forward(self, x: Tensor, plan: AttentionPlan, cache: Optional[KVCache] = None, layer: int = 0) -> Tensor:
        """x (batch, seq, d_model) attended as `plan` says (its rotation and mask, or its score sets)."""
        batch, seq, _ = x.shape
        q, k, v = project(self.qkv, x, self.qkv_sizes)
        q = self.q_norm(q.view(batch, seq, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_norm(k.view(batch, seq, self.kv_heads, self.head_dim)).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        sums = None
        if plan.input_bias is not None:  # c_t = Σ_{s≤t} u_s over every key: the bias c_i − c_j (FoX's)
            sums = plan.input_bias.token_increments(x).cumsum(-1)
            sums = sums if cache is None else cache.update_sums(layer, sums)
        temperature = plan.query_scale
        if temperature is None and self.temperature is not None:
            temperature = self.temperature(plan.query_positions)
        temperature = None if temperature is None else temperature.to(q.dtype)
        y = self.attend(q, k, v, plan, temperature, sums).transpose(1, 2)  # (B, T, H, hd)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x)).view(batch, seq, self.n_heads, -1).to(y.dtype)
        return self.proj(y.reshape(batch, seq, self.n_heads * self.head_dim))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, plan: AttentionPlan, temperature: Optional[Tensor],
               sums: Optional[Tensor]) -> Tensor:
        """Each head's attention output (B, H, T, hd) over the keys the plan lets each query see; sums: those of
        the plan's input bias (masks.with_input_bias), or None."""
        if plan.score_sets is not None:
            return merged_attention(q, k, v, plan.score_sets, temperature, sums)
        mask = plan.mask
        if plan.rotation is not None:
            q, k = plan.rotation(q, k)
        if temperature is not None:
            q = q * temperature
        dropout, gqa = self.dropout if self.training else 0.0, self.kv_heads != self.n_heads
        # Each head's (T, hd) block dense in memory: SDPA's CPU kernels run faster on it than on the heads
        # interleaved as the projection lays them out (bf16 attention at 4096 tokens 1.2x; a bf16 training step
        # of model=small 1.06x, AMD EPYC). After a rotation in float32 the copy is already made (kernels.rotate).
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if plan.contextual is not None:
            return contextual_attention(q, k, v, mask, plan.contextual, dropout)
        seq = q.shape[-2]
        if isinstance(mask, BlockedMask):
            return torch.cat([F.scaled_dot_product_attention(
                q[:, :, rows.start:rows.stop], k[:, :, keys.start:keys.stop], v[:, :, keys.start:keys.stop],
                attn_mask=with_input_bias(rows_mask, sums, seq, rows, keys, q.dtype), dropout_p=dropout, enable_gqa=gqa)
                for rows, keys, rows_mask in mask.blocks()], dim=2)
        # No mask and as many keys as queries: the fused causal kernels apply (flash / memory-efficient).
        causal = mask is None and seq == k.shape[-2] and seq > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout,
                                              enable_gqa=gqa)


class FeedForward(nn.Module):
    """SwiGLU, W2(silu(W1 x) ⊙ W3 x) (Shazeer 2020, arXiv:2002.05202), or the GPT-2 GELU MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.ffn == "swiglu"
        self.hidden = hidden = cfg.hidden_dim
        # Gate and up projections fused in one matmul: rows [0, hidden) gate, [hidden, 2·hidden) up.
        self.up = nn.Linear(cfg.d_model, 2 * hidden if self.gated else hidden, bias=cfg.bias)
        self.down = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            gate, up = project(self.up, x, (self.hidden, self.hidden))
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = make_norm(cfg, cfg.d_model), Attention(cfg)
        self.ffn_norm, self.ffn = make_norm(cfg, cfg.d_model), FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.resid_dropout)

    def forward(self, x: Tensor, plan: AttentionPlan, cache: Optional[KVCache] = None, layer: int = 0) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), plan, cache, layer))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class Transformer(nn.Module):
    """Token embedding, position encoding, N blocks, final norm, LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position = cfg.rope.build(cfg.shape, cfg.rope_scaling)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg, cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.apply(self._init_weights)
        # GPT-2 (Radford et al. 2019, sec. 2.3): residual projections scaled by 1/sqrt(2·n_layers),
        # so the residual stream's variance does not grow with depth.
        for block in self.blocks:
            for proj in (block.attn.proj, block.ffn.down):
                nn.init.normal_(proj.weight, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def compile_blocks(self, **compile_kwargs) -> None:
        """torch.compile every block in place, as torchtitan does. Not Module.compile on the whole model:
        training calls loss(), never __call__, so a compiled __call__ would not run. Blocks of one shape
        share their graph; the loss stays eager (its fused kernel already makes one pass per chunk)."""
        for block in self.blocks:
            block.compile(**compile_kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, exclude_embeddings: bool = True) -> int:
        """Parameters that do matmul work per token (embeddings excluded: a lookup costs no FLOPs)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and not self.cfg.tie_embeddings:
            total -= self.embed.weight.numel()
        if exclude_embeddings:  # an encoding's own lookup tables (learned positions) cost no FLOPs either
            total -= sum(m.weight.numel() for m in self.position.modules() if isinstance(m, nn.Embedding))
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N + 12·n_layers·d_model·seq_len (PaLM, Chowdhery et al. 2022, app. B)."""
        return 6 * self.num_params() + 12 * self.cfg.n_layers * self.cfg.d_model * seq_len

    def _mask(self, positions: Positions, dtype: torch.dtype, allowed: Allowed = None,
              position: Optional[PositionEncoding] = None, batch: int = 1) -> "Optional[Tensor | BlockedMask]":
        """The attention mask of the layers that use `position`: None when SDPA's own causal flag suffices, a
        BlockedMask when the whole mask would hold more than MASK_BUDGET elements (always, for a contextual
        encoding: its attention goes by blocks; for one whose bias reads the layer's input, (batch, heads) per
        pair, added by blocks; and for a pattern longer than PATTERN_ROWS queries, whose blocks then skip the
        keys they do not see), the mask itself otherwise.

        allowed: an optional (q_len, k_len) bool mask (True = may attend), or a pattern of (query index, key
        index), that replaces plain causal attention, e.g. the windows of an evaluation's attention method.
        position: the layer encoding whose bias the mask carries; by default the model's, at its first layer.
        """
        position = self.position.for_layer(0) if position is None else position
        q_len, k_len = positions.query.shape[-1], positions.key.shape[-1]
        if isinstance(allowed, Tensor) and allowed.shape != (q_len, k_len):
            raise ValueError(f"attention_mask: expected shape {(q_len, k_len)}, got {tuple(allowed.shape)}")
        if position.contextual or position.input_dependent:  # by blocks of queries: their scores are the budget
            return BlockedMask(position, positions, dtype, allowed, MASK_BUDGET // (k_len * self.cfg.n_heads * batch))
        last_row = position.attention_bias(positions.query[:, -1:], positions.key)  # a bias? of how many heads?
        if allowed is None and last_row is None and (q_len == k_len or q_len == 1):
            return None
        per_row = k_len * (1 if last_row is None else last_row.shape[1])
        if callable(allowed) and q_len > PATTERN_ROWS:
            return BlockedMask(position, positions, dtype, allowed, min(PATTERN_ROWS, MASK_BUDGET // per_row))
        if q_len * per_row > MASK_BUDGET:
            return BlockedMask(position, positions, dtype, allowed, MASK_BUDGET // per_row)
        return mask_rows(position, positions, range(q_len), k_len, dtype, allowed)

    def hidden_states(self, idx: Tensor, cache: Optional[KVCache] = None, attention_mask: Allowed = None,
                      positions: Optional[Positions] = None, attention: Optional["AttentionMethod"] = None,
                      scaling: Optional["Scaling"] = None, logn: bool = False) -> Tensor:
        """(batch, seq) token ids -> (batch, seq, d_model) after the final norm.

        positions: where the tokens sit; by default after the cache, 0, 1, 2, ... Computed once here and
        handed to the encoding, whose rotary tables are then shared by every layer.
        How an evaluation reads the model, its weights and modules untouched, is data given here:
        attention: an attention method (minillm.positions.methods), its parts computed here once; it replaces
        attention_mask. One this model's encoding cannot serve raises, naming it. Layers trained with a window
        (model.window) keep it, within attention_mask; the method applies to the others.
        scaling: another frequency scaling for a rotary model ("none": the encoding as built).
        logn: Qwen's log-n factor on every query; refused for a model that scales its queries itself.
        """
        cfg = self.cfg
        if positions is None:
            positions = Positions.contiguous(cache.length if cache is not None else 0, idx.shape[1], idx.device)
        position = self.position if scaling is None else self.position.rescaled(scaling)
        query_scale = None
        if logn:
            require(cfg.attn_temperature == cfg.nope_logit_scale == "none", "logn", "the model already scales its queries"
                    f" (model.attn_temperature={cfg.attn_temperature!r}, nope_logit_scale={cfg.nope_logit_scale!r})")
            require(cfg.context_length >= 2, "logn", f"needs a training length of at least 2, got {cfg.context_length}")
            query_scale = log_n_scale(positions.query, cfg.context_length)
        free_scale = None if cfg.nope_logit_scale == "none" else \
            swan_scale(idx.shape[1], positions.key.shape[-1], cfg.context_length, cfg.nope_logit_alpha, idx.device)
        x = position.embed(self.embed(idx), positions)
        windowed = [cfg.windowed(layer) for layer in range(cfg.n_layers)]
        if attention is not None:
            check_encoding(attention, cfg.rope, cfg.context_length)
            require(attention.name == "full" or not all(windowed), "attention", f"{attention.name} would apply to no "
                    f"layer: every one keeps its trained window (model.window={cfg.window}, model.window_layers=all)")
            parts = [(part.positions, part.pattern) for part in attention.parts(positions, cfg.context_length)]
        else:
            parts = [(positions, attention_mask)]
        rotations = [position.rotation(where) for where, _ in parts]
        if any(windowed):  # the training window, at the model's own positions: one part, a Window (BlockedMask)
            window_parts = [(positions, within(Window(0, cfg.window - 1), attention_mask))]
            window_rotations = rotations[:1] if parts[0][0] is positions else [position.rotation(positions)]
        plans: dict[tuple[PositionEncoding, bool], AttentionPlan] = {}  # layers of one encoding and window share one
        for layer, block in enumerate(self.blocks):
            # Position-free layers (model.nope_every): no rotation, and the mask without the encoding's bias.
            free = cfg.position_free(layer)
            encoding = NO_POSITIONS if free else position.for_layer(layer)
            key = (encoding, windowed[layer])
            if key not in plans:
                layer_parts, layer_rotations = (window_parts, window_rotations) if windowed[layer] else (parts, rotations)
                masks = [self._mask(where, x.dtype, allowed, encoding, x.shape[0]) for where, allowed in layer_parts]
                contextual = encoding if encoding.contextual else None
                input_bias = encoding if encoding.input_dependent else None
                scale = free_scale if free and free_scale is not None else query_scale
                if len(layer_parts) == 1:
                    plans[key] = AttentionPlan(None if free else layer_rotations[0], masks[0], positions.query,
                                               contextual, query_scale=scale, input_bias=input_bias)
                else:
                    score_sets = [ScoreSet(None if free else rotation, mask)
                                  for rotation, mask in zip(layer_rotations, masks)]
                    plans[key] = AttentionPlan(query_positions=positions.query, contextual=contextual,
                                               score_sets=score_sets, query_scale=scale, input_bias=input_bias)
            x = block(x, plans[key], cache, layer)
        return self.norm(x)

    def forward(self, idx: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        """Logits (batch, seq, vocab)."""
        return self.head(self.hidden_states(idx, cache))

    def token_losses(self, idx: Tensor, targets: Tensor, chunk_tokens: int = 8192, attention_mask: Allowed = None,
                     attention: Optional["AttentionMethod"] = None, scaling: Optional["Scaling"] = None,
                     logn: bool = False) -> Tensor:
        """Cross-entropy of each target (batch, seq) in float32; the LM head runs over chunks of tokens
        so that long evaluations never hold a (batch·seq, vocab) logit matrix at once."""
        hidden = self.hidden_states(idx, attention_mask=attention_mask, attention=attention, scaling=scaling,
                                    logn=logn).flatten(0, 1)
        flat_targets = targets.flatten()
        losses = [F.cross_entropy(self.head(h).float(), t, reduction="none")
                  for h, t in zip(hidden.split(chunk_tokens), flat_targets.split(chunk_tokens))]
        return torch.cat(losses).view_as(targets)

    def loss(self, idx: Tensor, targets: Tensor, positions: Optional[Positions] = None) -> Tensor:
        """Mean next-token cross-entropy (float32), the LM head fused with it: no full logit matrix.
        positions: the tokens' positions (a training sampler's); by default 0, 1, 2, ..."""
        hidden = self.hidden_states(idx, positions=positions).flatten(0, 1)
        return linear_cross_entropy(hidden, self.head.weight, targets.flatten())

    @torch.inference_mode()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 stop_token: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 scaling: Optional["Scaling"] = None, attention: Optional["AttentionMethod"] = None,
                 logn: bool = False) -> Tensor:
        """Extend idx (batch, seq) by up to max_new_tokens; temperature 0 is greedy. Rows that emitted
        stop_token keep repeating it; generation ends early once every row has.

        scaling, attention, logn: how the model is read, as hidden_states takes them; every step goes through the
        KV cache, each new query after the cached keys. Every attention method decodes with the cache: its parts
        are patterns of (query index, key index) and positions computed from the whole sequence at each step,
        and the cache keeps keys unrotated, so greedy decoding equals the argmax of full forwards over the
        growing sequence. The exception is a dynamic scaling (dynamic_ntk, dynamic_yarn, longrope's switch)
        past the training length in a model of more than one layer: see KVCache."""
        if temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k: must be >= 1, got {top_k}")
        read = dict(scaling=scaling, attention=attention, logn=logn)
        cache = KVCache(self.cfg.n_layers)
        logits = self.head(self.hidden_states(idx, cache, **read)[:, -1])  # the LM head on the last position only
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        out = idx
        for step in range(max_new_tokens):
            logits = logits.float()
            if temperature == 0:
                next_token = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_token = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
            if stop_token is not None:
                next_token = next_token.masked_fill(finished, stop_token)
                finished |= next_token == stop_token
            out = torch.cat((out, next_token[:, None]), dim=1)
            if step + 1 == max_new_tokens or (stop_token is not None and bool(finished.all())):
                break  # no forward pass for a token nobody will sample after
            logits = self.head(self.hidden_states(next_token[:, None], cache, **read)[:, -1])
        return out
