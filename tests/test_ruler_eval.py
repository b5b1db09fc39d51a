"""RULER as an evaluation measurement: greedy decoding with the KV cache under every scaling and attention method
(against full forwards), the chat template, the measurement's records, tables and refusals, and the script end to
end."""

from __future__ import annotations

import pytest
import torch

from minillm.eval.perplexity import scaling_for
from minillm.model.config import ModelConfig
from minillm.model.transformer import Transformer
from minillm.positions.base import POSITION_ENCODINGS, position_config
from minillm.positions.methods import ATTENTION_METHODS, attention_method, check_encoding
from minillm.positions.rotary import RotaryConfig
from minillm.positions.scaling import SCALINGS, scaling_config

VOCAB = 61
TRAINED = 8  # prompts of 10 tokens and 14 new ones: decoding runs to 3x the training length


def tiny_model(rope, n_layers: int = 2, **overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, context_length=TRAINED, d_model=32, n_layers=n_layers, n_heads=4,
                      n_kv_heads=2, rope=rope, init_std=0.5, **overrides)  # wide logits: no near-ties in argmax
    return Transformer(cfg).eval()


def prompt(batch: int = 2, seq: int = 10) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def greedy_by_full_forwards(model: Transformer, idx: torch.Tensor, steps: int, **read) -> torch.Tensor:
    """Greedy decoding without a cache: the whole growing sequence through hidden_states at every step."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model.head(model.hidden_states(idx, **read)[:, -1])
            idx = torch.cat((idx, logits.argmax(-1, keepdim=True)), dim=1)
    return idx


def evaluation_scaling(name: str, rotary_dim: int):
    """The scaling an evaluation at 3x the training length applies (longrope: made-up factors, one per frequency)."""
    if name != "longrope":
        return scaling_for(name, 3 * TRAINED, TRAINED, None)
    half = rotary_dim // 2
    return scaling_config({"type": "longrope", "factor": 3.0, "original_max_position": TRAINED,
                           "short_factor": [1.0 + i / half for i in range(half)],
                           "long_factor": [1.0 + 3 * i / half for i in range(half)]})


@pytest.mark.parametrize("method", sorted(ATTENTION_METHODS))
@pytest.mark.parametrize("scaling", sorted(SCALINGS))
def test_greedy_generate_with_a_cache_equals_full_forwards_for_every_scaling_and_method(scaling, method):
    """A rotary model serves every scaling and method. A dynamic scaling picks its frequencies from the current
    length, which the cached keys of deeper layers did not see (KVCache): one layer, where decoding is exact."""
    dynamic = SCALINGS[scaling].dynamic
    model = tiny_model(RotaryConfig("complex"), n_layers=1 if dynamic else 2)
    read = dict(scaling=evaluation_scaling(scaling, model.cfg.head_dim), attention=attention_method(method))
    idx = prompt()
    out = model.generate(idx, 14, temperature=0, **read)
    assert out.shape == (2, 24) and torch.equal(out[:, :10], idx)
    assert torch.equal(out, greedy_by_full_forwards(model, idx, 14, **read))
    assert len(set(out[:, 10:].flatten().tolist())) > 3  # a real continuation, not one repeated token


@pytest.mark.parametrize("encoding", sorted(POSITION_ENCODINGS))
def test_greedy_generate_with_log_n_equals_full_forwards_for_every_encoding(encoding):
    """Every encoding, queries scaled by log-n, under full attention and Self-Extend (two score sets) where it
    serves it (every method with a cache, every encoding: tests/test_attention.py); learned positions within
    their table (no forward runs after the last token). A method the encoding cannot serve is refused by name."""
    rope = position_config(encoding)
    model = tiny_model(rope)
    bounded = rope.max_position(TRAINED) is not None
    idx, steps = (prompt(seq=4), TRAINED - 4) if bounded else (prompt(), 10)
    for name in ("full", "self_extend"):
        method = attention_method(name)
        try:
            check_encoding(method, rope, TRAINED)
        except ValueError:
            with pytest.raises(ValueError, match=f"^attention: {name} "):  # before any step
                model.generate(idx, 2, temperature=0, attention=method)
            continue
        out = model.generate(idx, steps, temperature=0, attention=method, logn=True)
        assert torch.equal(out, greedy_by_full_forwards(model, idx, steps, attention=method, logn=True)), name
