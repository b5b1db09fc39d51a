"""Position samplers: contiguous as today, PoSE against its reference's sampling, randomized positions, determinism,
refusals naming the setting, and positions reaching the model."""

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from minillm.model.config import ModelConfig
from minillm.model.transformer import Transformer
from minillm.positions.base import POSITION_ENCODINGS, Positions, position_config
from minillm.positions.samplers import (POSITION_SAMPLERS, PoSESampler, PositionSampler, RandomizedSampler, generator_for, position_sampler, sampler_config)
from minillm.positions.scaling import LinearScaling, Scaling

CONF = Path(__file__).resolve().parents[1] / "conf"
T = 16


def breaks(row: torch.Tensor) -> int:
    """Places where the next position is not the previous one plus one."""
    return int((row.diff() != 1).sum())


# ----------------------------------------------------------------------------------------------
# Registry, configs, YAML


def test_registry_names_are_the_yaml_files_and_the_yaml_restates_no_default():
    from omegaconf import OmegaConf

    assert sorted(POSITION_SAMPLERS) == sorted(p.stem for p in (CONF / "positions").glob("*.yaml"))
    for name in POSITION_SAMPLERS:
        yaml = OmegaConf.to_container(OmegaConf.load(CONF / "positions" / f"{name}.yaml"))
        assert yaml == {"defaults": [f"/schema/positions/{name}@_here_"]}  # the schema only: no value restated


def test_yaml_composes_into_its_sampler():
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()  # what minillm.config.register_configs is to do, as it does for conf/rope
    for name, cls in POSITION_SAMPLERS.items():
        store.store(group="schema/positions", name=name, node=cls)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for name, cls in POSITION_SAMPLERS.items():
            cfg = compose(overrides=[f"+positions={name}"])
            assert sampler_config(OmegaConf.to_container(cfg.positions)) == cls()
        cfg = compose(overrides=["+positions=pose", "positions.target_length=64", "positions.chunks=3"])
        assert sampler_config(OmegaConf.to_container(cfg.positions)) == PoSESampler(chunks=3, target_length=64)


def test_configs_round_trip_through_plain_dicts():
    for sampler in (PositionSampler(), PoSESampler(chunks=3, target_length=64), RandomizedSampler(max_position=99)):
        assert sampler_config(dataclasses.asdict(sampler)) == sampler
        assert position_sampler(sampler.name, dataclasses.asdict(sampler)) == sampler
    assert sampler_config(None) == PositionSampler() and sampler_config("pose") == PoSESampler()
    assert position_sampler("randomized", {"max_position": 40}) == RandomizedSampler(max_position=40)


@pytest.mark.parametrize("make, setting", [
    (lambda: PoSESampler(chunks=0), "positions.chunks: must be at least 1, got 0"),
    (lambda: PoSESampler(target_length=0), "positions.target_length"),
    (lambda: PoSESampler(target_length=T - 1).positions(1, T, generator_for(0, 0)), "positions.target_length"),
    (lambda: PoSESampler().positions(1, T, generator_for(0, 0)), "positions.target_length: not set"),
    (lambda: PoSESampler(chunks=5, target_length=64).positions(1, 4, generator_for(0, 0)), "positions.chunks"),
    (lambda: RandomizedSampler(max_position=0), "positions.max_position"),
    (lambda: RandomizedSampler(max_position=T - 1).positions(1, T, generator_for(0, 0)), "positions.max_position"),
    (lambda: RandomizedSampler().positions(1, T, generator_for(0, 0)), "positions.max_position: not set"),
    (lambda: PoSESampler(sampler="randomized"), "positions.sampler"),
    (lambda: sampler_config({"sampler": "skipping"}), "positions.sampler"),
    (lambda: sampler_config({"sampler": "pose", "chunk": 2}), "positions.chunk"),
    (lambda: position_sampler("pose", RandomizedSampler()), "positions.sampler"),
    (lambda: PositionSampler().positions(0, T, generator_for(0, 0)), "positions"),
])
def test_bad_knobs_are_refused_naming_the_setting(make, setting):
    with pytest.raises(ValueError) as error:
        make()
    assert str(error.value).startswith(setting)


# ----------------------------------------------------------------------------------------------
# Contiguous


def test_contiguous_is_todays_positions_and_draws_nothing():
    generator = generator_for(0, 0)
    state = generator.get_state()
    got = PositionSampler().positions(4, T, generator)
    expected = Positions.contiguous(0, T, torch.device("cpu"))
    assert torch.equal(got.query, expected.query) and got.key is got.query and got.length == expected.length == T
    assert torch.equal(generator.get_state(), state)


# ----------------------------------------------------------------------------------------------
# PoSE


@pytest.mark.parametrize("chunks", [1, 2, 3, 5])
def test_pose_positions_are_chunks_of_contiguous_runs_within_the_target(chunks):
    target, batch = 4 * T, 2000
    sampler = PoSESampler(chunks=chunks, target_length=target)
    lengths, skips = sampler.sample_chunks(batch, T, generator_for(1, 0))
    positions = sampler.positions(batch, T, generator_for(1, 0))
    query = positions.query
    assert query.shape == (batch, T) and query.dtype == torch.long and positions.key is query
    assert positions.length == int(query.max()) + 1
    assert (query.diff(dim=1) > 0).all() and (query[:, 0] == 0).all() and (query[:, -1] < target).all()
    assert (lengths >= 1).all() and (lengths.sum(dim=1) == T).all()
    assert (skips[:, 0] == 0).all() and (skips.diff(dim=1) >= 0).all() and (skips[:, -1] <= target - T).all()
    # A break exactly where the skip grows: at the chunk boundaries, and nowhere inside a chunk.
    for row, row_lengths, row_skips in zip(query[:200], lengths[:200], skips[:200]):
        starts = row_lengths.cumsum(0)[:-1]
        jumps = (row.diff() != 1).nonzero().flatten() + 1
        assert jumps.tolist() == [int(s) for s, grew in zip(starts, row_skips.diff() > 0) if grew]
        for start, length, skip in zip([0, *starts.tolist()], row_lengths.tolist(), row_skips.tolist()):
            assert row[start:start + length].tolist() == list(range(start + skip, start + length + skip))
    counts = torch.tensor([breaks(row) for row in query])
    assert torch.equal(counts, (skips.diff(dim=1) > 0).sum(dim=1))  # exactly `chunks` runs unless two skips tie
    if chunks == 2:  # u_1 = 0 (one run) has probability 1/49; later skips tie more often as they near the end
        assert (counts == 1).float().mean() > 0.95


def test_pose_draws_cover_the_reference_ranges():
    target, batch = 4 * T, 4000
    lengths, skips = PoSESampler(target_length=target).sample_chunks(batch, T, generator_for(2, 0))
    # First chunk: every length 1 .. ⌊(T + 1)/2⌋, none longer; skip: every value 0 .. target − T, roughly evenly.
    assert sorted(set(lengths[:, 0].tolist())) == list(range(1, (T + 1) // 2 + 1))
    counts = torch.bincount(skips[:, 1], minlength=target - T + 1)
    assert len(counts) == target - T + 1 and counts.min() > 0.5 * batch / len(counts)
    assert counts.max() < 1.5 * batch / len(counts)
    assert abs(skips[:, 1].double().mean() - (target - T) / 2) < 1.0
    # The point of PoSE: a window of T tokens sees every distance up to target − 1.
    positions = PoSESampler(target_length=target).positions(batch, T, generator_for(2, 0)).query
    assert set((positions[:, -1] - positions[:, 0]).tolist()) == set(range(T - 1, target))


def reference_pose(first_draw: float, skip_draw: float, window: int, target: int) -> list[int]:
    """dwzhu-pku/PoSE src/train_pose.py, train_preprocess_function_pose (lines 166–182), its random.randint(a, b)
    given as a + ⌊u·(b − a + 1)⌋ of a uniform draw u."""
    randint = lambda a, b, u: a + int(u * (b - a + 1))
    len_chunk = window
    lt1 = 0
    rt1 = randint(1, (len_chunk + 1) // 2, first_draw)
    pos_ids = list(range(window))
    lt = 0
    rt = randint(lt, target - window, skip_draw)
    return [p + lt for p in pos_ids[:rt1 - lt1]] + [p + rt for p in pos_ids[rt1 - lt1:]]


def test_pose_equals_the_reference_transcribed_for_a_fixed_seed():
    target, batch = 5 * T, 64
    got = PoSESampler(target_length=target).positions(batch, T, generator_for(3, 9)).query
    generator = generator_for(3, 9)
    first = torch.rand(batch, generator=generator, dtype=torch.float64).tolist()  # every row's length, then skips
    skip = torch.rand(batch, generator=generator, dtype=torch.float64).tolist()
    assert got.tolist() == [reference_pose(f, s, T, target) for f, s in zip(first, skip)]


def first_run(row: list[int]) -> int:
    """Length of the leading contiguous run: the first chunk's (or the window's, when the skip was 0)."""
    return next((i for i in range(1, len(row)) if row[i] != row[i - 1] + 1), len(row))


def test_pose_matches_the_reference_distribution_under_python_random():
    target, n = 4 * T, 20000
    rng = random.Random(0)
    reference = [reference_pose(rng.random(), rng.random(), T, target) for _ in range(n)]
    ours = PoSESampler(target_length=target).positions(n, T, generator_for(4, 0)).query.tolist()
    for stat in (first_run, lambda row: row[-1]):
        a = torch.tensor([float(stat(row)) for row in reference])
        b = torch.tensor([float(stat(row)) for row in ours])
        assert abs(a.mean() - b.mean()) < 0.03 * a.mean() and a.min() == b.min() and a.max() == b.max()


def test_pose_at_the_window_length_is_contiguous():
    got = PoSESampler(chunks=3, target_length=T).positions(8, T, generator_for(0, 1)).query
    assert torch.equal(got, torch.arange(T).expand(8, T))


# ----------------------------------------------------------------------------------------------
# Randomized


def test_randomized_positions_are_a_sorted_subset_shared_by_the_batch():
    sampler = RandomizedSampler(max_position=4 * T)
    positions = sampler.positions(8, T, generator_for(5, 0))
    (row,) = positions.query
    assert positions.query.shape == (1, T) and positions.key is positions.query
    assert (row.diff() > 0).all() and row.min() >= 0 and row.max() < 4 * T and len(set(row.tolist())) == T
    assert positions.length == int(row.max()) + 1
    whole = RandomizedSampler(max_position=T).positions(2, T, generator_for(5, 0))  # every position of the range
    assert torch.equal(whole.query, torch.arange(T)[None])


def test_randomized_positions_cover_the_range_evenly():
    max_position, draws = 4 * T, 2000
    sampler = RandomizedSampler(max_position=max_position)
    rows = torch.cat([sampler.positions(1, T, generator_for(6, i)).query for i in range(draws)])
    counts = torch.bincount(rows.flatten(), minlength=max_position)
    expected = draws * T / max_position  # 500: each position is in a subset with probability T / max_position
    assert len(counts) == max_position and (counts > 0.75 * expected).all() and (counts < 1.25 * expected).all()
    assert 0.15 < (rows[:, 0] == 0).float().mean() < 0.35  # position 0 is not forced in (the reference: p = 1/4)


# ----------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("sampler", [PoSESampler(chunks=3, target_length=64), RandomizedSampler(max_position=64)])
def test_the_same_batch_index_gives_the_same_positions_whatever_ran_before(sampler):
    fresh = sampler.positions(4, T, generator_for(11, 5)).query
    for index in range(5):
        sampler.positions(4, T, generator_for(11, index))
    assert torch.equal(sampler.positions(4, T, generator_for(11, 5)).query, fresh)
    generator = generator_for(11, 5)
    state = generator.get_state()
    first = sampler.positions(4, T, generator).query
    generator.set_state(state)
    assert torch.equal(sampler.positions(4, T, generator).query, first)
    others = [sampler.positions(4, T, generator_for(*key)).query for key in ((11, 6), (12, 5), (11, 5, 1))]
    assert all(not torch.equal(other, fresh) for other in others)


def test_positions_move_to_the_device_without_reading_it_back():
    positions = PoSESampler(target_length=64).positions(2, T, generator_for(0, 0), device="meta")
    assert positions.query.device.type == "meta" and positions.length == int(
        PoSESampler(target_length=64).positions(2, T, generator_for(0, 0)).query.max()) + 1


# ----------------------------------------------------------------------------------------------
# Which encodings can take them


def test_resolved_defaults_the_reach_to_the_scaling_target():
    assert PoSESampler().resolved(T, LinearScaling(factor=4)).target_length == 4 * T
    assert RandomizedSampler().resolved(T, LinearScaling(factor=2.5)).max_position == 40
    assert PoSESampler(target_length=50).resolved(T, LinearScaling(factor=4)).target_length == 50
    assert PositionSampler().resolved(T, Scaling()) == PositionSampler()
    for sampler in (PoSESampler(), RandomizedSampler()):
        setting = f"positions.{sampler.reach_setting}"
        with pytest.raises(ValueError, match=f"^{setting}: not set, and rope_scaling='none'"):
            sampler.resolved(T, Scaling())


SPREAD = [PoSESampler(target_length=4 * T), RandomizedSampler(max_position=4 * T)]


ANYWHERE = [name for name in POSITION_ENCODINGS
            if position_config(name).reads_positions and position_config(name).max_position(T) is None]


@pytest.mark.parametrize("variant", ANYWHERE)
def test_every_encoding_that_reads_positions_at_any_place_is_accepted(variant):
    """Which encodings the samplers refuse, by the encodings' own contract, is in test_registries.py."""
    for sampler in [PositionSampler(), *SPREAD]:
        sampler.check(position_config(variant), T)


@pytest.mark.parametrize("sampler", SPREAD)
@pytest.mark.parametrize("variant, phrase", [("cope", "counts positions from the attention scores"),
                                             ("none", r"reads none \(NoPE\)")])
def test_encodings_that_ignore_given_positions_are_refused(sampler, variant, phrase):
    PositionSampler().check(position_config(variant), T)  # contiguous changes nothing: always fine
    with pytest.raises(ValueError, match=f"^positions.sampler: .*{phrase}"):
        sampler.check(position_config(variant), T)


def test_learned_positions_are_refused_past_their_table():
    learned = position_config("learned")
    for sampler in SPREAD:
        with pytest.raises(ValueError, match=f"^positions.{sampler.reach_setting}: 64 reaches past the learned"):
            sampler.check(learned, T)
    for sampler in (PositionSampler(), PoSESampler(target_length=T), RandomizedSampler(max_position=T)):
        sampler.check(learned, T)
    with pytest.raises(ValueError, match="^positions.target_length: 8 is below"):
        PoSESampler(target_length=8).check(position_config("complex"), T)


# ----------------------------------------------------------------------------------------------
# The positions reach the model


@pytest.mark.parametrize("variant", ["complex", "alibi", "sinusoidal"])
def test_sampled_positions_change_the_forward(variant):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, context_length=T, d_model=32, n_layers=1, n_heads=2, rope=position_config(variant))
    model = Transformer(cfg).eval()
    idx = torch.randint(0, 64, (2, T))
    for sampler in SPREAD:
        sampler.check(cfg.rope, cfg.context_length)
        positions = sampler.positions(2, T, generator_for(0, 0))
        with torch.no_grad():
            default = model.hidden_states(idx)
            contiguous = model.hidden_states(idx, positions=PositionSampler().positions(2, T, generator_for(0, 0)))
            sampled = model.hidden_states(idx, positions=positions)
        assert torch.equal(contiguous, default)
        assert torch.isfinite(sampled).all() and not torch.allclose(sampled, default, atol=1e-4)
        # Tokens before the first skip keep positions 0 .. l_0 − 1 and see only each other: unchanged (causal).
        first = first_run(positions.query[0].tolist()) if sampler.name == "pose" else 0
        torch.testing.assert_close(sampled[0, :first], default[0, :first])
