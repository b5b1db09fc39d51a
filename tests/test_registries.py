"""Every registered member against the checks all of its kind must pass, parametrized from the registries
themselves: registering an encoding, scaling, attention method, sampler or task puts it under these tests.

Encodings run at their defaults in a tiny model with grouped-query attention; scalings at their defaults (longrope
with the searched factors its defaults lack); methods, samplers and tasks at their defaults."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from test_synthetic import SOLVERS, check_example

from minillm.data.answers import example_generator
from minillm.data.synthetic import SYNTHETIC_TASKS, task_config
from minillm.model.config import ModelConfig
from minillm.model.transformer import KVCache, Transformer
from minillm.positions.base import POSITION_ENCODINGS, Positions, position_config
from minillm.positions.methods import ATTENTION_METHODS, attention_method
from minillm.positions.resonance import ResonanceScaling, integer_wavelengths
from minillm.positions.rotary import RotaryConfig
from minillm.positions.samplers import POSITION_SAMPLERS, generator_for, position_sampler, sampler_config
from minillm.positions.scaling import SCALINGS, LinearScaling, rotary_inv_freq, scaling_config

CONF = Path(__file__).resolve().parents[1] / "conf"
VOCAB, T = 61, 16
CPU = torch.device("cpu")


@contextmanager
def hydra_conf():
    from hydra import initialize_config_dir

    from minillm.cli import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def compose_option(group: str, option: str, *overrides: str):
    """conf/<group>/<option>.yaml composed on its own onto its schema: the config object it gives."""
    from hydra import compose
    from omegaconf import OmegaConf

    with hydra_conf():
        return OmegaConf.to_object(compose(overrides=[f"+{group}={option}", *overrides])[group])


def tiny(rope, rope_scaling=None, seed: int = 0, **overrides) -> Transformer:
    """A float32 model of 2 layers, 4 query heads over 2 key/value heads (head_dim 8), in eval mode."""
    kwargs = dict(vocab_size=VOCAB, context_length=T, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.1)
    kwargs.update(overrides)
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    torch.manual_seed(seed)
    return Transformer(ModelConfig(rope=rope, **kwargs)).eval()


def tokens(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def decode(model: Transformer, idx: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits of idx fed through a KV cache in consecutive chunks of the given sizes."""
    cache, logits, start = KVCache(model.cfg.n_layers), [], 0
    for size in chunks:
        logits.append(model(idx[:, start:start + size], cache))
        start += size
    return torch.cat(logits, dim=1)


def assert_causal_and_decodes(model: Transformer) -> None:
    """Changing tokens 9.. leaves the logits before them unchanged and changes those after; decoding through a
    KV cache (a prefill, single tokens, a multi-token chunk) gives the full forward's logits."""
    idx = tokens(2, T)
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1 + torch.arange(T - 9)) % VOCAB
    with torch.no_grad():
        before, after = model(idx), model(changed)
        cached = decode(model, idx, [5, 1, 1, 4, 5])
    torch.testing.assert_close(after[:, :9], before[:, :9], atol=1e-6, rtol=0)
    assert (after[:, 9:] - before[:, 9:]).abs().max() > 1e-3
    torch.testing.assert_close(cached, before, atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Position encodings (rope=)


ENCODINGS = list(POSITION_ENCODINGS)


@pytest.mark.parametrize("name", ENCODINGS)
def test_encoding_is_causal_and_decodes_with_a_cache_under_gqa(name):
    assert_causal_and_decodes(tiny(position_config(name)))


@pytest.mark.parametrize("name", ENCODINGS)
def test_encoding_under_bf16_autocast_is_finite_and_close_to_float32(name):
    model, idx = tiny(position_config(name)), tokens(2, T)
    with torch.no_grad():
        reference = model(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(idx)
    assert torch.isfinite(logits).all()
    assert (logits.float() - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.parametrize("name", ENCODINGS)
def test_encoding_gradients_reach_every_parameter(name):
    model = tiny(position_config(name)).train()
    idx = tokens(2, T + 1)
    model.loss(idx[:, :-1], idx[:, 1:]).backward()
    encoding = {id(p) for p in model.position.parameters()}
    assert encoding <= {id(p) for p in model.parameters()}, "the encoding's parameters are the model's"
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().max() > 0, parameter_name


@pytest.mark.parametrize("name", ENCODINGS)
def test_encoding_contracts_agree_with_the_built_encoding(name):
    """rotary_spectrum is the built rotation's (rotary_dim, theta); max_position its max_length."""
    config = position_config(name)
    model = tiny(config)
    spectrum = config.rotary_spectrum(model.cfg.head_dim)
    rotation = model.position.rotation(Positions.contiguous(0, T, CPU))
    assert config.is_rotary == (spectrum is not None) == (rotation is not None)
    if spectrum is not None:
        rotary_dim, theta = spectrum
        cfg = model.cfg
        q, k = torch.zeros(1, cfg.n_heads, T, cfg.head_dim), torch.zeros(1, cfg.kv_heads, T, cfg.head_dim)
        turned = rotation(q, k)[0].shape[-1]  # head_dim, or PoPE's widened 2·head_dim
        assert rotation.rotary_dim == rotary_dim and 0 < rotary_dim <= turned
        torch.testing.assert_close(model.position.inv_freq, rotary_inv_freq(theta, rotary_dim).float())
    assert config.max_position(T) == model.position.max_length, f"{name}: max_position is not the built max_length"
    assert config.label and all("=" in tag and not tag.startswith("rope=") for tag in config.tags())


@pytest.mark.parametrize("name", ENCODINGS)
def test_reads_positions_says_whether_given_positions_change_the_output(name):
    config = position_config(name)
    model, idx = tiny(config), tokens(2, 8)
    jumped = Positions.of(torch.tensor([0, 1, 2, 3, 8, 9, 10, 11]))  # within the training length
    with torch.no_grad():
        contiguous, moved = model.hidden_states(idx), model.hidden_states(idx, positions=jumped)
    torch.testing.assert_close(moved[:, :4], contiguous[:, :4])  # the same positions before the jump
    changed = not torch.allclose(moved, contiguous, atol=1e-5)
    assert config.reads_positions == changed, \
        f"{name}: reads_positions={config.reads_positions}, but given positions {'do' if changed else 'do not'} " \
        f"change its output"


@pytest.mark.parametrize("name", ENCODINGS)
def test_encoding_runs_past_the_training_length_unless_it_has_a_last_position(name):
    config = position_config(name)
    model, idx = tiny(config), tokens(1, 2 * T)
    limit = config.max_position(T)
    with torch.no_grad():
        if limit is None:
            assert torch.isfinite(model(idx)).all()
        else:
            assert torch.isfinite(model(idx[:, :limit])).all()
            with pytest.raises(ValueError):
                model(idx[:, :limit + 1])


@pytest.mark.parametrize("name", ENCODINGS)
def test_encoding_round_trips_and_its_yaml_composes(name):
    config = position_config(name)
    assert config.variant == name and type(config) is POSITION_ENCODINGS[name]
    assert position_config(dataclasses.asdict(config)) == config
    assert (CONF / "rope" / f"{name}.yaml").is_file()
    composed = compose_option("rope", name)
    assert type(composed) is POSITION_ENCODINGS[name] and composed.variant == name


# ----------------------------------------------------------------------------------------------
# Frequency scalings (rope_scaling=)


DIM, TRAINED = 16, 64


def scaling(name: str, dim: int = DIM, **overrides):
    """The registered scaling at its defaults, trained at TRAINED; longrope given the per-frequency factors its
    defaults lack (searched per model: 1 up to the trained length, the factor beyond), for `dim` rotary channels."""
    cls = SCALINGS[name]
    settings = {"original_max_position": TRAINED, **overrides}
    if "short_factor" in {f.name for f in dataclasses.fields(cls)}:
        factor = settings.get("factor", cls().factor)
        settings.update(short_factor=[1.0] * (dim // 2), long_factor=[factor] * (dim // 2))
    return cls(**settings)


SCALING_NAMES = list(SCALINGS)


def unscaled(s, theta: float, dim: int) -> torch.Tensor:
    """RoPE's frequencies as the scaling `s` keeps them: RoPE's own; Resonance's rounded to whole wavelengths
    (rounding is monotone, so what never speeds a feature up never passes rounded RoPE)."""
    inv_freq = rotary_inv_freq(theta, dim)
    return integer_wavelengths(inv_freq) if isinstance(s, ResonanceScaling) else inv_freq


@pytest.mark.parametrize("name", SCALING_NAMES)
def test_scaling_frequencies_are_float64_positive_and_never_faster_than_rope(name):
    s = scaling(name)
    base = unscaled(s, 10000.0, DIM)
    tables = {}
    for length in (16, TRAINED, 4 * TRAINED):
        inv_freq, attention_factor = s.frequencies(10000.0, DIM, length)
        assert inv_freq.shape == (DIM // 2,) and inv_freq.dtype == torch.float64
        assert bool((inv_freq > 0).all()) and bool((inv_freq <= base * (1 + 1e-12)).all())
        assert 0 < attention_factor < float("inf")
        tables[length] = inv_freq, attention_factor
    if not s.dynamic:  # a static scaling does not look at the length
        assert all(torch.equal(t[0], tables[16][0]) and t[1] == tables[16][1] for t in tables.values())


@pytest.mark.parametrize("name", SCALING_NAMES)
def test_scaling_by_factor_one_is_no_scaling_within_the_trained_length(name):
    s = scaling(name, factor=1.0)
    for length in (16, TRAINED):
        inv_freq, attention_factor = s.frequencies(10000.0, DIM, length)
        torch.testing.assert_close(inv_freq, unscaled(s, 10000.0, DIM), rtol=1e-12, atol=0)
        assert attention_factor == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name", SCALING_NAMES)
def test_scaled_rotary_model_is_causal_and_decodes_with_a_cache(name):
    """Within the training length even a dynamic scaling keeps its frequencies, so a cache decodes exactly."""
    model = tiny(RotaryConfig("complex"), rope_scaling=scaling(name, dim=8, original_max_position=None))
    # the trained length reaches every scaling that has a formula (ModelConfig resolves it once; "none" reads none)
    assert model.position.scaling.name == name and \
        model.position.scaling.original_max_position == (None if name == "none" else T)
    assert_causal_and_decodes(model)


@pytest.mark.parametrize("name", SCALING_NAMES)
def test_scaling_round_trips_and_its_yaml_composes(name):
    cls = SCALINGS[name]
    assert cls.name == name and cls().type == name and scaling_config({"type": name}) == cls()
    assert scaling_config(dataclasses.asdict(scaling(name))) == scaling(name)
    assert (CONF / "rope_scaling" / f"{name}.yaml").is_file()
    assert type(compose_option("rope_scaling", name)) is cls


# ----------------------------------------------------------------------------------------------
# Attention methods at evaluation (attention=[...], knobs under methods.<name>)


METHODS = list(ATTENTION_METHODS)


def seen_distance(method, length: int, trained: int = 8) -> dict[tuple[int, int], float]:
    """{(i, j): query position − key position of the one part that admits (i, j)}; asserts the parts are
    disjoint and within causal attention."""
    positions = Positions.contiguous(0, length, CPU)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    table: dict[tuple[int, int], float] = {}
    for part in method.parts(positions, trained):
        assert part.positions.query.shape[-1] == length and part.positions.key.shape[-1] == length
        admitted = (j <= i) if part.pattern is None else part.pattern(i, j)
        distance = part.positions.query[0][:, None] - part.positions.key[0][None, :]
        for a, b in admitted.nonzero().tolist():
            assert b <= a, f"({a}, {b}) is not causal"
            assert (a, b) not in table, f"parts overlap at {(a, b)}"
            table[a, b] = float(distance[a, b])
    return table


@pytest.mark.parametrize("name", METHODS)
def test_method_parts_are_disjoint_causal_and_let_each_query_see_itself(name):
    for length in (1, 5, 40):
        table = seen_distance(attention_method(name), length)
        assert all((i, i) in table and table[i, i] == 0 for i in range(length))


@pytest.mark.parametrize("name", METHODS)
def test_the_model_attends_as_plain_attention_exactly_where_the_parts_are_plain(name):
    """Where the parts admit every causal pair at its own distance, the model's output is the plain forward's;
    where they do not, it differs ("full" is plain at every length)."""
    method = attention_method(name)
    model = tiny(RotaryConfig("complex"), context_length=8)
    for length in (3, 40):
        plain = seen_distance(method, length) == {(i, j): i - j for i in range(length) for j in range(i + 1)}
        idx = tokens(1, length)
        with torch.no_grad():
            same = torch.allclose(model.hidden_states(idx, attention=method), model.hidden_states(idx), atol=1e-5)
        assert same == plain, (length, plain)


@pytest.mark.parametrize("name", METHODS)
def test_method_knobs_compose_in_the_evaluation_config(name):
    from hydra import compose

    from minillm.registry import to_run_config

    cls = ATTENTION_METHODS[name]
    assert cls.name == name and attention_method(name) == cls()
    assert attention_method(name, dataclasses.asdict(cls())) == cls()
    with hydra_conf():
        cfg = compose("eval", overrides=["ckpt=run", f"attention=[{name}]", "logger=none"])
        assert set(cfg.methods[name]) == {f.name for f in dataclasses.fields(cls)}
        config = to_run_config(cfg)
    assert config.attention == [name] and config.method(name) == cls()


# ----------------------------------------------------------------------------------------------
# Position samplers (positions=)


SAMPLERS = list(POSITION_SAMPLERS)


def resolved_sampler(name: str):
    """The registered sampler at its defaults, its reach (if any) from a 4x linear scaling: 4 × T."""
    return POSITION_SAMPLERS[name]().resolved(T, LinearScaling(factor=4.0))


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_positions_are_increasing_non_negative_and_within_reach(name):
    sampler = resolved_sampler(name)
    positions = sampler.positions(3, T, generator_for(0, 0))
    query = positions.query
    assert query.dtype == torch.int64 and query.shape[0] in (1, 3) and query.shape[1] == T
    assert positions.key is query and positions.length == int(query.max()) + 1 <= sampler.reach(T)
    assert int(query.min()) >= 0 and bool((query.diff(dim=1) > 0).all())
    assert torch.equal(sampler.positions(3, T, generator_for(0, 0)).query, query)  # one draw per generator state
    if sampler.contiguous:
        assert torch.equal(query, torch.arange(T)[None]) and sampler.reach(T) == T
    else:
        assert sampler.reach(T) == 4 * T


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_round_trips_and_its_yaml_composes(name):
    cls = POSITION_SAMPLERS[name]
    assert cls.name == name and cls().sampler == name and sampler_config(name) == cls()
    sampler = resolved_sampler(name)
    assert sampler_config(dataclasses.asdict(sampler)) == sampler
    assert position_sampler(name, dataclasses.asdict(sampler)) == sampler
    assert (CONF / "positions" / f"{name}.yaml").is_file()
    assert compose_option("positions", name) == cls()


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_refuses_exactly_the_encodings_that_cannot_take_its_positions(name, encoding):
    """Refused: a non-contiguous sampler on an encoding that reads no positions, or past its last position."""
    sampler, config = resolved_sampler(name), position_config(encoding)
    limit = config.max_position(T)
    refused = not sampler.contiguous and (not config.reads_positions or (limit is not None and sampler.reach(T) > limit))
    if refused:
        with pytest.raises(ValueError, match=r"^positions\."):
            sampler.check(config, T)
    else:
        sampler.check(config, T)


# ----------------------------------------------------------------------------------------------
# Synthetic tasks (data.task=, knobs under data.tasks.<name>)


TASKS = list(SYNTHETIC_TASKS)


@pytest.mark.parametrize("name", TASKS)
def test_task_answers_are_recovered_by_its_reference_solver(name):
    task = task_config(name)
    assert type(task) in SOLVERS, f"tests/test_synthetic.py needs a reference solver for the {name} task"
    for length in (task.min_length, 64, 257):
        for seed in range(4):
            check_example(task, max(length, task.min_length), seed)


@pytest.mark.parametrize("name", TASKS)
def test_task_layout_sizes_and_determinism(name):
    task = task_config(name)
    assert len(task.token_names()) == task.vocab_size and len(set(task.token_names())) == task.vocab_size
    small, large = task.sizes(64), task.sizes(256)
    assert small.keys() == large.keys() and all(large[k] >= small[k] for k in small) and large != small
    first, again = (task.sample(64, example_generator(5, 7)) for _ in range(2))
    assert all(torch.equal(getattr(first, f), getattr(again, f)) for f in ("inputs", "targets", "answers"))
    other = task.sample(64, example_generator(5, 8))
    assert not torch.equal(first.inputs, other.inputs)
    with pytest.raises(ValueError, match=r"^model\.context_length:"):
        task.sample(task.min_length - 1, example_generator(0, 0))


@pytest.mark.parametrize("name", TASKS)
def test_task_round_trips_and_its_knobs_compose(name):
    from hydra import compose

    from minillm.registry import to_run_config

    cls = SYNTHETIC_TASKS[name]
    assert cls.name == name and task_config(name) == cls()
    assert task_config(name, dataclasses.asdict(cls())) == cls()
    with hydra_conf():
        cfg = compose("config", overrides=["data=synthetic", f"data.task={name}"])
        assert set(cfg.data.tasks[name]) == {f.name for f in dataclasses.fields(cls)}
        run = to_run_config(cfg)
    assert run.data.task == name and run.data.synthetic_task == cls()
