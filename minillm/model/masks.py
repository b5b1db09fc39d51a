"""Attention masks by blocks of queries (training windows among them), biases from the layer's input, score sets merged
by log-sum-exp, the explicit attention of contextual encodings (CoPE, stick-breaking), the plan a layer gets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from minillm.kernels import attention_with_lse
from minillm.positions.base import PositionEncoding, Positions
from minillm.positions.methods import Window
from minillm.positions.rotary import Rotation

if TYPE_CHECKING:
    pass

Allowed = "Optional[Tensor | Callable[[Tensor, Tensor], Tensor]]"  # a (q_len, k_len) bool mask or a pattern of indices


NO_POSITIONS = PositionEncoding()  # what a position-free layer asks for its mask
MASK_BUDGET = 2**24  # elements of an attention mask held at once (64 MiB in float32); larger ones go by blocks
# Queries per block of a windowed pattern (an attention method's part): each block attends only to the keys it
# sees, so a window or a far part costs what it covers instead of the whole causal triangle.
PATTERN_ROWS = 256


class BlockedMask:
    """An attention mask too large to hold whole, built one block of queries at a time: ALiBi at 16k
    tokens and 12 heads would otherwise be a 13 GB (heads, q_len, k_len) tensor.

    Each block covers only the range of keys its queries may see: for causal patterns, up to the block's
    own last index; for a window or a far part (an attention method's), from the first key any of its
    queries sees. So a block of B queries holds at most B · k_len mask elements per head, and attention
    over it costs what its queries see, not the whole causal triangle. Contextual encodings (CoPE, stick-breaking) count
    positions over every key from the first, so their blocks start at key 0. Without autograd, every
    layer builds each block as it goes, so one block exists at a time. With autograd, SDPA keeps each
    layer's mask for the backward: the blocks are then built once and shared by every layer, at most the
    memory of the whole mask.
    """

    def __init__(self, position: PositionEncoding, positions: Positions, dtype: torch.dtype,
                 allowed: Allowed, rows_per_block: int):
        self.position, self.positions, self.dtype, self.allowed = position, positions, dtype, allowed
        q_len, k_len = positions.query.shape[-1], positions.key.shape[-1]
        step = max(1, rows_per_block)
        # Without a bias, keys that every query of a block sees need no mask at all (see pieces()).
        plain = allowed is not None and not position.contextual and \
            position.attention_bias(positions.query[:, :1], positions.key[:, :1]) is None
        # (query rows, keys seen, keys every row sees or None): here, so blocks() reads no tensor
        self.spans: list[tuple[range, range, Optional[range]]] = []
        for start in range(0, q_len, step):
            rows = range(start, min(start + step, q_len))
            if allowed is None:  # causal: no key after the block's last query is seen
                self.spans.append((rows, range(0, k_len - q_len + rows.stop), None))
                continue
            if isinstance(allowed, Window):  # its ranges of keys follow from its distances: no pair evaluated
                offset = k_len - q_len  # key index of query row 0
                keys, dense = allowed.keys(offset + rows.start, offset + rows.stop - 1, k_len)
                keys = keys if len(keys) else range(0, 1)  # a blind block still needs one key
            else:
                visible = visible_keys(allowed, positions, rows, k_len)
                seen = visible.any(0).nonzero()
                keys = range(int(seen[0]), int(seen[-1]) + 1) if len(seen) else range(0, 1)
                dense = _longest_run(visible.all(0))
            if position.contextual:
                keys = range(0, keys.stop)
            keep_dense = plain and dense is not None and len(dense) >= len(rows)
            self.spans.append((rows, keys, dense if keep_dense else None))
        self.prebuilt = [self._build(rows, keys) for rows, keys, _ in self.spans] if torch.is_grad_enabled() else None

    def _build(self, rows: range, keys: range) -> Tensor:
        return mask_rows(self.position, self.positions, rows, keys, self.dtype, self.allowed)

    def blocks(self):
        """(query rows, keys, mask) per block, rows and keys as ranges; the mask is (…, len(rows), len(keys))."""
        for i, (rows, keys, _) in enumerate(self.spans):
            yield rows, keys, self.prebuilt[i] if self.prebuilt is not None else self._build(rows, keys)

    def pieces(self):
        """(query rows, [(keys, mask or None), ...]) per block: the block's keys cut into a run that every one of
        its queries sees (mask None: attend to every key; no mask to build or read) and the rest with their
        masks. Attention over the pieces, merged by their log-sum-exp, is attention over the block."""
        for i, (rows, keys, dense) in enumerate(self.spans):
            if dense is None:
                yield rows, [(keys, self.prebuilt[i] if self.prebuilt is not None else self._build(rows, keys))]
                continue
            rest = [r for r in (range(keys.start, dense.start), range(dense.stop, keys.stop)) if len(r)]
            if self.prebuilt is not None:
                yield rows, [(dense, None), *((r, self.prebuilt[i][..., r.start - keys.start:r.stop - keys.start])
                                              for r in rest)]
            else:
                yield rows, [(dense, None), *((r, self._build(rows, r)) for r in rest)]


def _longest_run(flags: Tensor) -> Optional[range]:
    """The longest run of True in a 1-D bool tensor, as a range of indices; None if there is none."""
    edges = torch.diff(F.pad(flags.to(torch.int8), (1, 1)))
    starts, stops = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
    if not len(starts):
        return None
    best = int((stops - starts).argmax())
    return range(int(starts[best]), int(stops[best]))


def _key_range(keys: "int | range") -> range:
    return range(keys) if isinstance(keys, int) else keys


def visible_keys(allowed: Allowed, positions: Positions, rows: range, keys: "int | range") -> Tensor:
    """(len(rows), len(keys)) bool: which keys (a range of key indices, or a count from 0) the query rows `rows`
    see. allowed: None (causal: query row r is the (k_len − q_len + r)-th token and sees the keys up to itself),
    a (q_len, k_len) bool mask, or a pattern of (query index, key index), indices counting the cache."""
    keys = _key_range(keys)
    first = positions.key.shape[-1] - positions.query.shape[-1]  # key index of query 0 (after a cache)
    device = positions.query.device
    if allowed is None:
        return torch.ones(len(rows), len(keys), dtype=torch.bool, device=device).tril(first + rows.start - keys.start)
    if isinstance(allowed, Tensor):
        return allowed[rows.start:rows.stop, keys.start:keys.stop]
    query = torch.arange(first + rows.start, first + rows.stop, device=device)[:, None]
    return allowed(query, torch.arange(keys.start, keys.stop, device=device)[None, :])


def within(window: Window, allowed: Allowed) -> Allowed:
    """The keys that both a layer's training window (model.window) and `allowed` (None: causal, a (q_len, k_len)
    bool mask, or a pattern) let each query see; the Window itself when nothing else restricts it, so that a
    BlockedMask reads each block's keys from its distances and the cost stays linear in the length."""
    if allowed is None:
        return window
    if isinstance(allowed, Tensor):  # query row r is the (k_len − q_len + r)-th token, as in visible_keys
        q_len, k_len = allowed.shape
        query = torch.arange(k_len - q_len, k_len, device=allowed.device)[:, None]
        return allowed & window(query, torch.arange(k_len, device=allowed.device)[None, :])
    return lambda query, key: window(query, key) & allowed(query, key)


def mask_rows(position: PositionEncoding, positions: Positions, rows: range, keys: "int | range", dtype: torch.dtype,
              allowed: Allowed) -> Tensor:
    """The mask of query rows `rows` over `keys` (a range, or a count from 0): the encoding's bias at those
    positions with the visible keys kept (see visible_keys), -inf elsewhere; the bool mask of visible keys
    where the encoding has no bias."""
    keys = _key_range(keys)
    visible = visible_keys(allowed, positions, rows, keys)
    bias = position.attention_bias(positions.query[:, rows.start:rows.stop], positions.key[:, keys.start:keys.stop])
    return visible if bias is None else bias.masked_fill_(~visible, float("-inf")).to(dtype)


def with_input_bias(mask: Optional[Tensor], sums: Optional[Tensor], q_len: int, rows: range, keys: range,
                    dtype: torch.dtype) -> Optional[Tensor]:
    """The mask of query rows `rows` over `keys` (bool, additive, or None: every key) with the bias an encoding reads
    from the layer's input added (PositionEncoding.token_increments): c_i − c_j = Σ_{t=j+1..i} u_t, `sums` the
    running sums c (batch, heads, k_len) float32 over every key, the queries being the last q_len. Without sums,
    the mask as it is."""
    if sums is None:
        return mask
    first = sums.shape[-1] - q_len + rows.start  # key index of query row rows.start
    bias = sums[..., first:first + len(rows), None] - sums[..., None, keys.start:keys.stop]
    if mask is not None:
        bias = bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else bias + mask.float()
    return bias.to(dtype)


@dataclass
class ScoreSet:
    """One set of a layer's attention scores: q and k turned by `rotation` (None: as they are), restricted by `mask`
    (None: causal), a BlockedMask when long."""

    rotation: Optional[Rotation]
    mask: "Optional[Tensor | BlockedMask]"


@dataclass
class AttentionPlan:
    """What one layer's attention is handed by the forward, all of it computed once per forward from its positions.

    Either a single set of scores (`rotation` and `mask`; `contextual` for CoPE or stick-breaking, whose mask is
    then a BlockedMask of the keys each query sees) or, for an evaluation's attention method, `score_sets`: disjoint
    sets of scores, each with its own rotation and mask, attended with one softmax. `query_scale` is a factor on
    each query handed in by an evaluation (Qwen's log-n); otherwise the layer's own query temperature, if it has
    one, reads `query_positions`. `input_bias` is the layer encoding whose bias reads the layer's input (FoX): the
    layer computes its sums, and every mask is then a BlockedMask, the bias added one block of queries at a time.
    """

    rotation: Optional[Rotation] = None
    mask: "Optional[Tensor | BlockedMask]" = None  # None: causal
    query_positions: Optional[Tensor] = None  # (batch or 1, q_len)
    contextual: Optional[PositionEncoding] = None
    score_sets: Optional[list[ScoreSet]] = None
    query_scale: Optional[Tensor] = None  # (batch or 1, 1, q_len, 1) float32
    input_bias: Optional[PositionEncoding] = None  # the layer encoding whose bias reads the layer's input (FoX)


def merged_attention(q: Tensor, k: Tensor, v: Tensor, parts: list[ScoreSet], temperature: Optional[Tensor],
                     sums: Optional[Tensor] = None) -> Tensor:
    """One softmax over the union of disjoint score sets, computed set by set: each set's attention output is
    weighted by exp(lse_p − logsumexp_p(lse_p)), its share of the softmax's normaliser (exact: the two-pass merge
    of ReRoPE and Self-Extend; each set through kernels.attention_with_lse, SDPA's fused kernel on CPU). A long
    set goes by blocks of queries, each over the pieces of keys it sees (BlockedMask.pieces), merged the same way;
    `sums`: an input bias's running sums (with_input_bias), added to every piece. Queries that no set sees get
    zeros."""
    q_len = q.shape[-2]
    merged = []
    for part in parts:
        q_part, k_part = part.rotation(q, k) if part.rotation is not None else (q, k)
        if temperature is not None:
            q_part = q_part * temperature
        if isinstance(part.mask, BlockedMask):
            blocks = [merge_by_lse([attention_with_lse(q_part[:, :, rows.start:rows.stop],
                                                       k_part[:, :, keys.start:keys.stop],
                                                       v[:, :, keys.start:keys.stop],
                                                       with_input_bias(mask, sums, q_len, rows, keys, q.dtype),
                                                       causal=False)
                                    for keys, mask in pieces])
                      for rows, pieces in part.mask.pieces()]
            merged.append((torch.cat([b[0] for b in blocks], dim=2), torch.cat([b[1] for b in blocks], dim=2)))
        else:
            merged.append(attention_with_lse(q_part, k_part, v, part.mask))
    return merge_by_lse(merged)[0]


def merge_by_lse(pieces: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Attention outputs over disjoint sets of keys, each with its log-sum-exp (−inf: saw nothing), merged into
    the attention over their union: the outputs weighted by their shares of the normaliser."""
    if len(pieces) == 1:
        return pieces[0]
    lse = torch.stack([piece_lse for _, piece_lse in pieces])  # (pieces, batch, heads, q_len)
    total = lse.logsumexp(0)
    shares = (lse - total).exp().nan_to_num(0.0)
    return sum(share[..., None].to(out.dtype) * out for share, (out, _) in zip(shares, pieces)), total


def contextual_attention(q: Tensor, k: Tensor, v: Tensor, mask: BlockedMask, context: PositionEncoding,
                         dropout: float) -> Tensor:
    """softmax(s + context_logits(q, s)) v with s = q·kᵀ/√d (−inf at keys not seen), one block of queries at a time.

    Written out rather than through SDPA: CoPE's logits, and stick-breaking's log-weights, are functions of the
    scores themselves, which SDPA's attn_mask cannot express. Scores and softmax in float32, autocast or not; a
    query that sees no key gets zeros, as from SDPA.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # grouped-query heads: each key/value head serves `groups` query heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale, out = q.shape[-1] ** -0.5, []
    with torch.autocast(q.device.type, enabled=False):
        for rows, keys, visible in mask.blocks():
            q_rows = q[:, :, rows.start:rows.stop].float()
            scores = (q_rows @ k[:, :, keys.start:keys.stop].float().transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
            weights = (scores + context.context_logits(q_rows, scores)).softmax(-1).nan_to_num(0.0)
            out.append(F.dropout(weights, dropout).to(v.dtype) @ v[:, :, keys.start:keys.stop])
    return torch.cat(out, dim=2)
