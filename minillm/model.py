"""The decoder-only transformer: norms, attention, feed-forward, blocks, KV cache and generation (plain torch)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from minillm.config import ModelConfig
from minillm.kernels import linear_cross_entropy, split_linear
from minillm.rope import PositionEncoding, build_position_encoding


def _at_least_float32(x: Tensor) -> Tensor:
    """bf16 / fp16 in float32 (no copy for float32, float64 kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _RMSNormFunction(torch.autograd.Function):
    """y = x · r · g with r = (mean(x²) + eps)^−½ per row, saving only x and r.

    Backward, with x̂ = x·r and u = ∂y ⊙ g:  ∂x = r · (u − x̂ · mean(u ⊙ x̂)),  ∂g = Σ_rows ∂y ⊙ x̂.
    That is LayerNorm's backward given mean 0 and r as its rstd, but for one term: LayerNorm's ∂x also
    subtracts r · mean(u), which is added back here. So it runs as torch's fused layer-norm backward (one
    pass) plus a mat-vec and a broadcast add: 2.4x faster (measured by hand, 2048×384 float32) than the
    formula's eight tensor ops, which were themselves twice as fast as autograd's op-by-op backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x32, w32 = _at_least_float32(x), _at_least_float32(weight)
        dim = x32.shape[-1]
        rstd = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square_().div_(dim).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return torch.mul(x32, rstd).mul_(w32).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], None]:
        x, weight, rstd = ctx.saved_tensors
        x32 = _at_least_float32(x)  # the forward's compute dtype; the fused kernel wants one dtype throughout
        grad32, w32 = grad.to(x32.dtype), weight.to(x32.dtype)
        dim = x32.shape[-1]
        needs_x, needs_weight = ctx.needs_input_grad[:2]
        grad_x, grad_weight, _ = torch.ops.aten.native_layer_norm_backward(
            grad32, x32, [dim], torch.zeros_like(rstd), rstd, w32, None, [needs_x, needs_weight, False])
        if needs_x:
            mean_u = torch.mv(grad32.reshape(-1, dim), w32).view_as(rstd)
            grad_x = grad_x.add_(mean_u.mul_(rstd).div_(dim)).to(x.dtype)
        if needs_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · g (Zhang & Sennrich 2019, arXiv:1910.07467), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        # Compiled: Inductor fuses the formula itself into one kernel each way.
        x32 = _at_least_float32(x)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # Gain applied in float32 too, one rounding at the end: output dtype = input dtype, whatever the weight's.
        return (normed * _at_least_float32(self.weight)).to(x.dtype)


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
    """

    def __init__(self, n_layers: int):
        self.keys: list[Optional[Tensor]] = [None] * n_layers
        self.values: list[Optional[Tensor]] = [None] * n_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[-1] is None else self.keys[-1].shape[-2]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=-2)
            v = torch.cat((self.values[layer], v), dim=-2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


MASK_BUDGET = 2**24  # elements of an attention mask held at once (64 MiB in float32); larger ones go by blocks


class BlockedMask:
    """An attention mask too large to hold whole, built one block of queries at a time: ALiBi at 16k
    tokens and 12 heads would otherwise be a 13 GB (heads, q_len, k_len) tensor.

    Each block covers the keys up to the last one its queries may see (for causal patterns, up to the
    block's own last position), so a block of B queries holds at most B · k_len mask elements per head.
    Without autograd, every layer builds each block as it goes, so one block exists at a time. With
    autograd, SDPA keeps each layer's mask for the backward: the blocks are then built once and shared by
    every layer, at most the memory of the whole mask.
    """

    def __init__(self, position: PositionEncoding, q_len: int, k_len: int, device: torch.device,
                 dtype: torch.dtype, allowed: Optional[Tensor], rows_per_block: int):
        self.position, self.device, self.dtype, self.allowed = position, device, dtype, allowed
        first = k_len - q_len  # key position of query 0 (after a cache)
        step = max(1, rows_per_block)
        self.spans = []  # (query rows, their key positions, keys seen): here, so blocks() never reads tensor values
        for start in range(0, q_len, step):
            rows = range(start, min(start + step, q_len))
            queries = range(first + rows.start, first + rows.stop)
            if allowed is None:  # causal: no key after the block's last query is seen
                keys = queries.stop
            else:
                seen = allowed[rows.start:rows.stop].any(0).nonzero()
                keys = int(seen[-1]) + 1 if len(seen) else 1  # a block that sees nothing still needs one key
            self.spans.append((rows, queries, keys))
        self.prebuilt = [self._build(*span) for span in self.spans] if torch.is_grad_enabled() else None

    def _build(self, rows: range, queries: range, keys: int) -> Tensor:
        visible = None if self.allowed is None else self.allowed[rows.start:rows.stop, :keys]
        return _mask_rows(self.position, queries, keys, self.device, self.dtype, visible)

    def blocks(self):
        """(query rows, key count, mask) per block; the mask is (…, len(rows), key count)."""
        for i, (rows, queries, keys) in enumerate(self.spans):
            yield rows, keys, self.prebuilt[i] if self.prebuilt is not None else self._build(rows, queries, keys)


def _mask_rows(position: PositionEncoding, queries: range, k_len: int, device: torch.device, dtype: torch.dtype,
               allowed: Optional[Tensor]) -> Tensor:
    """The mask of queries at key positions `queries` over keys [0, k_len): the encoding's bias (the causal
    mask folded in) restricted to `allowed` where given, else `allowed`, else plain causal rows."""
    bias = _batched_bias(position, queries, k_len, device, dtype)
    if allowed is not None:
        return allowed if bias is None else bias.masked_fill(~allowed, float("-inf"))
    return bias if bias is not None else _causal_rows(queries.start, len(queries), k_len, device)


def _batched_bias(position: PositionEncoding, queries: range, k_len: int, device: torch.device,
                  dtype: torch.dtype) -> Optional[Tensor]:
    """The encoding's bias as (1, heads, queries, keys): SDPA's fused CPU kernel takes 2-d or 4-d masks
    only, and a 3-d one sends it to the math path, which holds every score (3x slower at 4096 tokens)."""
    bias = position.attention_bias(queries, k_len, device, dtype)
    return None if bias is None else bias.unsqueeze(0)


def _causal_rows(first_query: int, n_queries: int, k_len: int, device: torch.device) -> Tensor:
    """Query i (at key position first_query + i) sees keys up to its own position."""
    return torch.ones(n_queries, k_len, dtype=torch.bool, device=device).tril(diagonal=first_query)


class Attention(nn.Module):
    """Causal self-attention: fused qkv projection, grouped-query heads, optional QK-norm, SDPA."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.bias)
        self.qkv_sizes = (cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim)
        self.proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        # QK-norm (as in FLUX): RMSNorm over each head's channels keeps attention logits bounded.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.dropout = cfg.attn_dropout

    def forward(self, x: Tensor, position: PositionEncoding, mask: "Optional[Tensor | BlockedMask]",
                cache: Optional[KVCache] = None, layer: int = 0, offset: int = 0) -> Tensor:
        batch, seq, _ = x.shape
        q, k, v = split_linear(x, self.qkv.weight, self.qkv.bias, self.qkv_sizes)
        q = self.q_norm(q.view(batch, seq, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_norm(k.view(batch, seq, self.kv_heads, self.head_dim)).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        q, k = position.rotate(q, k, offset)
        dropout, gqa = self.dropout if self.training else 0.0, self.kv_heads != self.n_heads
        if isinstance(mask, BlockedMask):
            y = torch.cat([F.scaled_dot_product_attention(q[:, :, rows.start:rows.stop], k[:, :, :keys], v[:, :, :keys],
                                                          attn_mask=rows_mask, dropout_p=dropout, enable_gqa=gqa)
                           for rows, keys, rows_mask in mask.blocks()], dim=2)
        else:
            # No mask and as many keys as queries: the fused causal kernels apply (flash / memory-efficient).
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and seq == k.shape[-2] and seq > 1,
                                               dropout_p=dropout, enable_gqa=gqa)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))


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
            gate, up = split_linear(x, self.up.weight, self.up.bias, (self.hidden, self.hidden))
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = make_norm(cfg, cfg.d_model), Attention(cfg)
        self.ffn_norm, self.ffn = make_norm(cfg, cfg.d_model), FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.resid_dropout)

    def forward(self, x: Tensor, position: PositionEncoding, mask: "Optional[Tensor | BlockedMask]",
                cache: Optional[KVCache] = None, layer: int = 0, offset: int = 0) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), position, mask, cache, layer, offset))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class Transformer(nn.Module):
    """Token embedding, position encoding, N blocks, final norm, LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position = build_position_encoding(cfg)
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
        if exclude_embeddings and hasattr(self.position, "table"):
            total -= self.position.table.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N + 12·n_layers·d_model·seq_len (PaLM, Chowdhery et al. 2022, app. B)."""
        return 6 * self.num_params() + 12 * self.cfg.n_layers * self.cfg.d_model * seq_len

    def _mask(self, q_len: int, k_len: int, device: torch.device, dtype: torch.dtype,
              allowed: Optional[Tensor] = None) -> "Optional[Tensor | BlockedMask]":
        """The attention mask shared by all layers: None when SDPA's own causal flag suffices, a BlockedMask
        when the whole mask would hold more than MASK_BUDGET elements, the mask itself otherwise.

        allowed: an optional (q_len, k_len) bool pattern (True = may attend) that replaces plain causal
        attention, e.g. the sliding or blockwise windows of the extrapolation evaluation.
        """
        if allowed is not None and allowed.shape != (q_len, k_len):
            raise ValueError(f"attention_mask: expected shape {(q_len, k_len)}, got {tuple(allowed.shape)}")
        queries = range(k_len - q_len, k_len)  # after a cache, the queries are the last q_len keys
        last_row = _batched_bias(self.position, queries[-1:], k_len, device, dtype)  # a bias? of how many heads?
        if allowed is None and last_row is None and (q_len == k_len or q_len == 1):
            return None
        per_row = k_len * (1 if last_row is None else last_row.shape[1])
        if q_len * per_row > MASK_BUDGET:
            return BlockedMask(self.position, q_len, k_len, device, dtype, allowed, MASK_BUDGET // per_row)
        return _mask_rows(self.position, queries, k_len, device, dtype, allowed)

    def hidden_states(self, idx: Tensor, cache: Optional[KVCache] = None,
                      attention_mask: Optional[Tensor] = None) -> Tensor:
        """(batch, seq) token ids -> (batch, seq, d_model) after the final norm."""
        offset = cache.length if cache is not None else 0
        x = self.position.embed(self.embed(idx), offset)
        mask = self._mask(idx.shape[1], offset + idx.shape[1], idx.device, x.dtype, attention_mask)
        for layer, block in enumerate(self.blocks):
            x = block(x, self.position, mask, cache, layer, offset)
        return self.norm(x)

    def forward(self, idx: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        """Logits (batch, seq, vocab)."""
        return self.head(self.hidden_states(idx, cache))

    def token_losses(self, idx: Tensor, targets: Tensor, chunk_tokens: int = 8192,
                     attention_mask: Optional[Tensor] = None) -> Tensor:
        """Cross-entropy of each target (batch, seq) in float32; the LM head runs over chunks of tokens
        so that long evaluations never hold a (batch·seq, vocab) logit matrix at once."""
        hidden = self.hidden_states(idx, attention_mask=attention_mask).flatten(0, 1)
        flat_targets = targets.flatten()
        losses = [F.cross_entropy(self.head(h).float(), t, reduction="none")
                  for h, t in zip(hidden.split(chunk_tokens), flat_targets.split(chunk_tokens))]
        return torch.cat(losses).view_as(targets)

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy (float32), the LM head fused with it: no full logit matrix."""
        hidden = self.hidden_states(idx).flatten(0, 1)
        return linear_cross_entropy(hidden, self.head.weight, targets.flatten())

    @torch.inference_mode()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 stop_token: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Extend idx (batch, seq) by up to max_new_tokens; temperature 0 is greedy. Rows that emitted
        stop_token keep repeating it; generation ends early once every row has."""
        if temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k: must be >= 1, got {top_k}")
        cache = KVCache(self.cfg.n_layers)
        logits = self.head(self.hidden_states(idx, cache)[:, -1])  # the LM head on the last position only
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
            logits = self(next_token[:, None], cache)[:, -1]
        return out
