"""Position samplers for training: the positions a window of T tokens gets, so a model can learn longer ones.

A training window stays model.context_length tokens long; its sampler says where those tokens sit:
    contiguous   0 .. T − 1, as without a sampler
    pose         PoSE (arXiv:2309.10400): chunks of the window shifted by growing skips, up to target_length
    randomized   Ruoss et al. (arXiv:2305.16843): a sorted random subset of [0, max_position)
`sampler.positions(batch, length, generator)` returns `minillm.rope.Positions` (keys are the queries: no cache),
drawn on the CPU from `generator` alone, so one generator state gives one answer on every device;
`generator_for(seed, index)` makes the batch with a given index draw the same positions whatever ran before (resume).
`sampler.check(encoding, context_length)` refuses encodings that cannot take the positions.
Adding a sampler means one config class registered with `@register_sampler` and one YAML in conf/positions.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from minillm.positions.base import PositionConfig, Positions
from minillm.positions.scaling import Scaling
from minillm.registry import Registry, require


def generator_for(seed: int, *index: int) -> torch.Generator:
    """A CPU generator that depends on (seed, index...) only, e.g. (seed, batch index) or (seed, step, rank).

    Hashed, not seed + index: neighbouring seeds would otherwise share streams shifted by one batch.
    """
    key = ":".join(str(int(part)) for part in (seed, *index))
    digest = hashlib.blake2b(f"minillm.positions:{key}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def _uniform_int(low: Tensor, high: Tensor, generator: torch.Generator) -> Tensor:
    """One integer uniform on [low, high] (inclusive, as Python's random.randint) per element; int64 bounds.

    float64 draws: per-row bounds in one call; the bias is below range/2^53, far below sampling noise."""
    draw = torch.rand(low.shape, generator=generator, dtype=torch.float64)
    return low + (draw * (high - low + 1).double()).floor().long().minimum(high - low)


# Each PositionSampler subclass under its name: the value of its `sampler` field and its YAML's name.
POSITION_SAMPLERS = Registry("positions.sampler", field="sampler", default="contiguous")
register_sampler = POSITION_SAMPLERS.register


@register_sampler("contiguous")
@dataclass
class PositionSampler:
    """Contiguous positions 0 .. T − 1, shared by every row: today's training, no draw taken."""

    sampler: str = "contiguous"  # the registry name: checkpoints store it to rebuild the right class

    name: ClassVar[str] = "contiguous"
    reach_setting: ClassVar[Optional[str]] = None  # the field holding one past the largest position (None: T)

    def __post_init__(self) -> None:
        require(self.sampler == self.name, "positions.sampler",
                 f"{type(self).__name__} is the {self.name!r} sampler, got sampler={self.sampler!r}")

    @property
    def contiguous(self) -> bool:
        return self.reach_setting is None

    def reach(self, length: int) -> int:
        """One past the largest position a window of `length` tokens can get."""
        return length if self.reach_setting is None else getattr(self, self.reach_setting)

    def resolved(self, context_length: int, scaling: Scaling) -> "PositionSampler":
        """This sampler with its reach, if unset, defaulted as PoSE's reference does: the training length times the
        frequency scaling's factor (rope_scaling's extended length, rounded up where the reference rounds down:
        equal for whole factors); refused when that is no longer than the window (rope_scaling=none)."""
        if self.reach_setting is None or getattr(self, self.reach_setting) is not None:
            return self
        target = scaling.extended_length(context_length)
        require(target > context_length, f"positions.{self.reach_setting}",
                 f"not set, and rope_scaling={scaling.name!r} (factor {scaling.factor:g}) extends "
                 f"model.context_length={context_length} to no more than itself; set it")
        return dataclasses.replace(self, **{self.reach_setting: target})

    def check_window(self, length: int) -> None:
        """Raise, naming the setting, if the knobs cannot place a window of `length` tokens."""
        require(length >= 1, "positions", f"a window needs at least 1 token, got {length}")

    def check(self, encoding: PositionConfig, context_length: int) -> None:
        """Raise, naming the setting, if `encoding` (a model's PositionConfig) cannot be trained on these positions
        with windows of `context_length` tokens: one that reads no given positions (encoding.reads_positions: NoPE,
        CoPE), or one whose table stops short of the reach (encoding.max_position: learned)."""
        self.check_window(context_length)
        if self.contiguous:
            return
        require(not encoding.contextual, "positions.sampler",
                 f"{self.name} gives the tokens positions, but rope.variant={encoding.variant!r} counts positions "
                 f"from the attention scores and never reads them; use positions=contiguous")
        # NoPE is refused rather than allowed: the sampler would change nothing, and a run named "pose" that
        # trained exactly as contiguous would be read as a result about PoSE.
        require(encoding.reads_positions, "positions.sampler",
                 f"{self.name} gives the tokens positions, but rope.variant={encoding.variant!r} reads none (NoPE), "
                 f"so training would be unchanged; use positions=contiguous")
        # A table of rows (learned: model.context_length of them) has no row past them to train.
        reach, limit = self.reach(context_length), encoding.max_position(context_length)
        require(limit is None or reach <= limit, f"positions.{self.reach_setting}",
                 f"{reach} reaches past the {encoding.variant} table's {limit} rows (model.context_length): "
                 f"rope.variant={encoding.variant!r} has no embedding for positions ≥ {limit}; use rope=sinusoidal "
                 f"or a relative encoding")

    def draw(self, batch: int, length: int, generator: torch.Generator) -> Tensor:
        """(batch or 1, length) int64 positions on the CPU."""
        return torch.arange(length)[None]

    def positions(self, batch: int, length: int, generator: torch.Generator,
                  device: "torch.device | str | None" = None) -> Positions:
        """Positions of a batch of `batch` windows of `length` tokens, drawn from `generator` (a CPU generator),
        moved to `device`; the keys are the queries' very tensor (no cache: one set of rotary tables)."""
        require(batch >= 1, "positions", f"a batch needs at least 1 row, got {batch}")
        self.check_window(length)
        drawn = self.draw(batch, length, generator)
        query = drawn.to(device) if device is not None else drawn
        return Positions(query, query, int(drawn.max()) + 1)  # length from the CPU copy: no device sync


@register_sampler("pose")
@dataclass
class PoSESampler(PositionSampler):
    """PoSE (Zhu et al. 2023, arXiv:2309.10400, sec. 3.2): the window cut into chunks, chunk i's positions
    contiguous and shifted by a skip u_i, so a window of T tokens sees relative distances up to target_length − 1.

    Per row, with S = target_length − T (eq. 3–4 and the reference, dwzhu-pku/PoSE src/train_pose.py,
    `train_preprocess_function_pose`, lines 156–187 at a3d4ba8):
      lengths  chunk 0 takes l_0 ~ U{1 .. ⌊(T + 1)/2⌋} (line 169, `rt1 = random.randint(1, (len_chunk+1)//2)`),
               the last chunk the rest. With more than two chunks (the reference has two; the paper, sec. 3.2,
               "randomly divide[s]" without saying how) each chunk i < N − 1 does the same over A_i, the tokens left
               to it and the last chunk once every chunk in between keeps one: l_i ~ U{1 .. ⌊(A_i + 1)/2⌋}.
      skips    u_0 = 0 (sec. 3.2 "we set the initial bias terms u_0 ... to 0"; line 178, `lt = 0`), then
               u_i ~ U{u_{i−1} .. S} (eq. before 4; line 179, `rt = random.randint(lt, S)`): non-decreasing, so
               positions increase, and the last one is T − 1 + u_{N−1} ≤ target_length − 1.
      positions  st_i + u_i .. st_i + l_i − 1 + u_i, st_i = l_0 + .. + l_{i−1} (eq. 4; lines 181–182).
    Draw order: the N − 1 lengths of every row, then the N − 1 skips (for N = 2 the reference's order).
    Not here: the text skipping v_i (eq. 5: chunk i's tokens read from later in the document; the data's part,
    which the paper finds matters little, app. A), and the position interpolation the paper trains with
    (rope_scaling; the reference's target is ⌊T × rope_scaling.factor⌋, line 215: see `resolved`).

    target_length has no default guess: null until set, or until `resolved` gives it the run's rope_scaling
    target; positions() refuses it unset.
    """

    sampler: str = "pose"  # the registry name (positions=pose)
    chunks: int = 2  # the paper's N (sec. 3.2: two keep closest to the pre-training structure)
    target_length: Optional[int] = None  # the context length to reach (positions 0 .. target_length − 1)

    reach_setting: ClassVar[Optional[str]] = "target_length"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.chunks >= 1, "positions.chunks", f"must be at least 1, got {self.chunks}")
        require(self.target_length is None or self.target_length >= 1, "positions.target_length",
                 f"must be positive (or null until the run sets it), got {self.target_length}")

    def check_window(self, length: int) -> None:
        super().check_window(length)
        require(self.target_length is not None, "positions.target_length",
                 "not set: pose needs the context length to reach (e.g. 4 × model.context_length)")
        require(self.target_length >= length, "positions.target_length",
                 f"{self.target_length} is below the window of {length} tokens; it must be at least the window")
        require(self.chunks <= length, "positions.chunks",
                 f"{self.chunks} chunks need a window of at least as many tokens, got {length}")

    def sample_chunks(self, batch: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Chunk lengths and skips, both (batch, chunks) int64: the draws that `positions` lays out."""
        self.check_window(length)
        n, room = self.chunks, self.target_length - length
        left = torch.full((batch,), length, dtype=torch.long)  # tokens for chunks i .. N − 1
        lengths = []
        for i in range(n - 1):
            shared = left - (n - 2 - i)  # chunk i's and the last chunk's, after one for each chunk in between
            lengths.append(_uniform_int(torch.ones_like(left), (shared + 1) // 2, generator))
            left = left - lengths[-1]
        lengths.append(left)
        skips = [torch.zeros(batch, dtype=torch.long)]
        for _ in range(n - 1):
            skips.append(_uniform_int(skips[-1], torch.full_like(skips[-1], room), generator))
        return torch.stack(lengths, dim=1), torch.stack(skips, dim=1)

    def draw(self, batch: int, length: int, generator: torch.Generator) -> Tensor:
        lengths, skips = self.sample_chunks(batch, length, generator)
        ends = lengths.cumsum(dim=1)[:, :-1]  # (batch, N − 1): the first index of chunks 1 .. N − 1
        index = torch.arange(length)
        chunk = (index[None, :, None] >= ends[:, None, :]).sum(-1)  # (batch, T): the chunk of each token
        return index[None] + skips.gather(1, chunk)


@register_sampler("randomized")
@dataclass
class RandomizedSampler(PositionSampler):
    """Randomized positions (Ruoss et al. 2023, arXiv:2305.16843, sec. 3): T positions drawn without replacement
    from [0, max_position) and sorted, as the reference's `noisy_fixed_positional_encodings`
    (google-deepmind/randomized_positional_encodings models/positional_encodings.py lines 196–226 at e8c6474:
    `jrandom.choice(rng, jnp.arange(noise_max_length), shape=(sequence_length,), replace=False)`, then
    `jnp.sort`). Position 0 is not forced in. One draw per batch, shared by its rows, as there (one rng key per
    forward, the indexes without a batch axis: models/transformer.py lines 205–218 use the same key for q and k).

    max_position has no default guess (the reference's example uses 2048 for training lengths up to 40): null
    until set, or until `resolved` gives it the run's rope_scaling target; positions() refuses it unset.
    """

    sampler: str = "randomized"  # the registry name (positions=randomized)
    max_position: Optional[int] = None  # positions are drawn from 0 .. max_position − 1 (the reference's L)

    reach_setting: ClassVar[Optional[str]] = "max_position"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.max_position is None or self.max_position >= 1, "positions.max_position",
                 f"must be positive (or null until the run sets it), got {self.max_position}")

    def check_window(self, length: int) -> None:
        super().check_window(length)
        require(self.max_position is not None, "positions.max_position",
                 "not set: randomized needs the range to draw positions from (e.g. 4 × model.context_length)")
        require(self.max_position >= length, "positions.max_position",
                 f"{self.max_position} is below the window of {length} tokens: {length} distinct positions need "
                 f"a range of at least as many")

    def draw(self, batch: int, length: int, generator: torch.Generator) -> Tensor:
        # A random permutation's first T entries: a uniform subset without replacement, as jrandom.choice's.
        return torch.randperm(self.max_position, generator=generator)[:length].sort().values[None]


def sampler_config(d: "dict | str | PositionSampler | None") -> PositionSampler:
    """A sampler from its plain dict (as stored in checkpoints and given by Hydra), a registry name, or None
    (contiguous)."""
    if isinstance(d, PositionSampler):
        return d
    return POSITION_SAMPLERS.build({"sampler": d} if isinstance(d, str) else d or {}, "positions")


def position_sampler(name: str, settings: "dict | PositionSampler | None" = None) -> PositionSampler:
    """The registered sampler `name` with its knobs (a dict as Hydra gives it, or the config itself)."""
    POSITION_SAMPLERS.lookup(name)
    if isinstance(settings, PositionSampler):
        require(settings.name == name, "positions.sampler", f"asked for {name!r}, given a {settings.name!r} sampler")
        return settings
    return POSITION_SAMPLERS.build(settings or {}, "positions", name=name)
