"""LongRoPE's factor search (minillm.eval.longrope_search, scripts/longrope_search.py): the seeds against
transformers' own scalings, the monotone constraint, a search that must improve on its seeds, fitness recomputed by
transformers' LongRoPE, resume, foreign logs, and the result read back by training and evaluation."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from minillm.cli import register_configs
from minillm.data.config import DataConfig
from minillm.eval.longrope_factors import model_identity, searched_scaling, subject_longrope
from minillm.eval.longrope_search import (
    Evolution,
    LongRopeSearchConfig,
    SearchLog,
    evolve,
    log_path,
    monotone,
    run_search,
    seed_factors,
)
from minillm.positions.scaling import LongRopeScaling
from minillm.registry import to_run_config
from test_eval_script import tiny_runs  # noqa: F401  (the session's trained runs, shared with the script tests)

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
TRAINED, THETA, DIM = 32, 500.0, 16  # the tiny Qwen2 of tests/test_pretrained.py: 4 heads of 16 channels


# ----------------------------------------------------------------------------------------------
# Seeds and candidates


def test_seeds_are_transformers_pi_and_yarn_and_the_ntk_formula():
    """λ_i = θ_i / θ'_i: PI and YaRN from transformers' own rope functions, NTK-aware as s^(2i/(d−2)) by hand."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scale = 4.0
    seeds = seed_factors(THETA, DIM, TRAINED, scale)
    base = 1.0 / THETA ** (np.arange(0, DIM, 2) / DIM)

    def hf_factors(params: dict) -> np.ndarray:
        config = transformers.LlamaConfig(hidden_size=DIM * 4, num_attention_heads=4, max_position_embeddings=128,
                                          rope_parameters={"rope_theta": THETA, **params})
        inv_freq, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
        return base / inv_freq.double().numpy()

    np.testing.assert_allclose(seeds["pi"], hf_factors({"rope_type": "linear", "factor": scale}), rtol=1e-6)
    np.testing.assert_allclose(seeds["yarn"], hf_factors({"rope_type": "yarn", "factor": scale,
                                                          "original_max_position_embeddings": TRAINED}), rtol=1e-6)
    np.testing.assert_allclose(seeds["ntk"], scale ** (2 * np.arange(DIM // 2) / (DIM - 2)), rtol=1e-12)
    assert all(monotone(f) and f[0] >= 1 for f in seeds.values())


def test_mutations_and_crossovers_are_monotone_new_and_within_the_bounds():
    settings = LongRopeSearchConfig(ckpt="-", mutation_rate=0.5)
    evolution = Evolution(settings, 4.0, np.random.default_rng(0))
    seeds = list(seed_factors(THETA, DIM, TRAINED, 4.0).values())
    children = [evolution.mutate(seeds[i % 3]) for i in range(200)]
    children += [evolution.crossover(children[i], children[i + 1]) for i in range(0, 198, 2)]
    children = [c for c in children if c is not None]
    assert len(children) > 250
    assert all(monotone(c) and c.min() >= 1.0 and c.max() <= 5.0 + 1e-9 for c in children)  # 1.25 × s
    assert len({tuple(c) for c in children}) == len(children)  # none proposed twice


# ----------------------------------------------------------------------------------------------
# The search on a known landscape: it must beat every seed, and resume exactly


def landscape(optimum: np.ndarray):
    """A fitness with a known best (a monotone vector no seed equals), counting its calls."""
    calls = []

    def score(factors: np.ndarray) -> tuple[float, float, float]:
        calls.append(factors.copy())
        loss = float(np.sum((factors - optimum) ** 2))
        return loss, math.exp(loss), 0.0

    return score, calls


OPTIMUM = np.array([1.0, 1.3, 2.0, 2.0, 3.1, 3.5, 4.6, 4.6])


def search(tmp_path: Path, name: str, **knobs):
    settings = LongRopeSearchConfig(ckpt="-", population=8, parents=4, generations=12, **knobs)
    score, calls = landscape(OPTIMUM)
    candidates = evolve(score, seed_factors(THETA, DIM, TRAINED, 4.0), settings, 4.0,
                        SearchLog(tmp_path / name, {"search": "test"}))
    return candidates, calls


def test_the_search_beats_every_seed_by_a_margin_on_a_known_landscape(tmp_path):
    candidates, calls = search(tmp_path, "log.jsonl")
    assert len(candidates) == len(calls) == 8 + 12 * 4
    best = min(c.loss for c in candidates)
    seeds = {c.origin: c.loss for c in candidates if c.generation == 0 and c.origin != "mutation"}
    assert set(seeds) == {"pi", "ntk", "yarn"}
    assert best < 0.5 * min(seeds.values())  # a search that only kept its seeds fails here
    assert all(monotone(c.factors) for c in candidates)
    assert {c.origin for c in candidates if c.generation > 0} == {"mutation", "crossover"}


def test_a_resumed_search_from_a_torn_log_ends_as_an_uninterrupted_one(tmp_path):
    whole, _ = search(tmp_path, "whole.jsonl")
    lines = (tmp_path / "whole.jsonl").read_text().splitlines(keepends=True)
    torn = "".join(lines[:21]) + lines[21][:40]  # the header, 20 candidates, half of the 21st
    (tmp_path / "torn.jsonl").write_text(torn)
    resumed, calls = search(tmp_path, "torn.jsonl")
    assert len(calls) == len(whole) - 20  # only what the log lacked was scored
    assert [c.record() for c in resumed] == [c.record() for c in whole]
    assert (tmp_path / "torn.jsonl").read_text() == "".join(lines)
    larger, calls = search(tmp_path, "torn.jsonl", evaluations=10)  # a smaller budget reads the log only
    assert not calls and [c.record() for c in larger] == [c.record() for c in whole[:10]]


def test_a_log_written_by_another_search_is_refused_by_name(tmp_path):
    SearchLog(tmp_path / "log.jsonl", {"model": "a", "seed": 0})
    with pytest.raises(ValueError, match=r"^log: .*log.jsonl was written by another search: seed 0 there, 1 here"):
        SearchLog(tmp_path / "log.jsonl", {"model": "a", "seed": 1})
    (tmp_path / "other.jsonl").write_text('{"index": 0}\n')
    with pytest.raises(ValueError, match=r"^log: .*other.jsonl is not a LongRoPE search log"):
        SearchLog(tmp_path / "other.jsonl", {"model": "a"})


# ----------------------------------------------------------------------------------------------
# A real model: a tiny random Qwen2 folder read on Python source


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A search of a tiny hf: folder at 4x its 32 tokens on argparse's source: (settings, result, folder, text)."""
    import argparse

    from test_pretrained import family_config, random_hf, save_with_tokenizer

    root = tmp_path_factory.mktemp("longrope")
    folder = save_with_tokenizer(random_hf(family_config("qwen2")), root / "tiny-qwen2")
    text = root / "text.txt"
    text.write_text(Path(argparse.__file__).read_text()[:20000])
    settings = LongRopeSearchConfig(ckpt=f"hf:{folder}", data=DataConfig(path=str(text), cache_dir=str(root / "cache")),
                                    windows=2, population=6, parents=3, generations=2, precision="float32",
                                    out=str(root / "out" / "longrope.json"))
    out, result = run_search(settings)
    return settings, result, folder, text


def hf_ppl(folder: Path, tokens: torch.Tensor, long_factor: list[float], result: dict) -> float:
    """Perplexity under transformers' own LongRoPE (its rope function, its switch to long factors past L0)."""
    config = transformers.AutoConfig.from_pretrained(folder)
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": THETA, "factor": result["factor"],
                              "original_max_position_embeddings": TRAINED, "short_factor": [1.0] * len(long_factor),
                              "long_factor": long_factor}
    config.max_position_embeddings = result["target_length"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(hf(row[None, :-1]).logits[0], row[1:]) for row in tokens]
    return float(torch.stack(losses).mean().exp())


def windows_of(folder: Path, text: Path, length: int, count: int) -> torch.Tensor:
    ids = transformers.AutoTokenizer.from_pretrained(folder).encode(text.read_text(), add_special_tokens=False)
    assert len(ids) >= length + 1
    return torch.tensor(ids[:length + 1])[None][:count]  # the file is one document: one window


def test_the_logged_fitness_is_transformers_own_longrope_perplexity(searched):
    settings, result, folder, text = searched
    assert (result["target_length"], result["fitness_length"], result["factor"]) == (128, 128, 4.0)
    assert result["model"] == model_identity(str(folder))
    tokens = windows_of(folder, text, 128, settings.windows)
    rows = [json.loads(line) for line in Path(result["log"]).read_text().splitlines()[1:]]
    assert len(rows) == result["evaluations"] == 6 + 2 * 3
    assert all(monotone(np.asarray(r["long_factor"])) for r in rows)
    best = min(rows, key=lambda r: r["ppl"])
    assert (result["long_factor"], result["best"]["ppl"]) == (best["long_factor"], best["ppl"])
    for row in [best, *[r for r in rows if r["origin"] in ("pi", "yarn")]]:
        assert row["ppl"] == pytest.approx(hf_ppl(folder, tokens, row["long_factor"], result), rel=2e-5)


def test_the_result_is_a_training_scaling_and_an_evaluation_scaling(searched, tmp_path):
    from minillm.eval.config import EvalConfig
    from minillm.eval.loop import plan
    from minillm.eval.measurement import Reading
    from minillm.eval.perplexity import PerplexityMeasurement, PerplexityRecord, scaling_for
    from minillm.eval.sources import pretrained_subject
    from minillm.interop.pretrained import PretrainedSource

    settings, result, folder, text = searched
    file = settings.out
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        run = to_run_config(compose("config", overrides=["rope_scaling=longrope", f"rope_scaling.factors={file}",
                                                         "model.d_model=64", "model.n_heads=4"]))
    scaling = run.model.rope_scaling
    assert (scaling.long_factor, scaling.short_factor) == (result["long_factor"], [1.0] * 8)
    assert (scaling.factor, scaling.original_max_position) == (4.0, 32)
    with pytest.raises(ValueError, match=r"^rope_scaling.factors: .*longrope.json holds 8 factors, this model has "
                                         r"rotary_dim/2 = 16 frequencies: it was searched for another model"):
        from minillm.model.config import ModelConfig

        ModelConfig(d_model=128, n_heads=4, rope_scaling=LongRopeScaling(factors=file))

    config = EvalConfig(ckpt=f"hf:{folder}", data=DataConfig(path=str(text)), scalings=["none", "longrope"],
                        longrope_factors=file, lengths=[128], max_documents=settings.windows, batch_size=1,
                        passkey_trials=0, precision="float32")
    subject = pretrained_subject(PretrainedSource.parse(config.ckpt), config, torch.device("cpu"))
    searched_for_model = subject_longrope(subject, config.longrope_factors)
    measurement = PerplexityMeasurement(subject, plan(subject, config), config)
    reading = Reading(subject.model, subject.setting, 128, config.method("full"),
                      scaling_for("longrope", 128, TRAINED, None, searched_for_model))
    [record] = measurement.measure(reading)
    assert record.ppl == pytest.approx(result["best"]["ppl"], rel=1e-6)
    # the evaluation's loop finds the factors itself, beside "none" (the model as trained)
    from minillm.eval.loop import measure

    by_scaling = {r.setting.scaling: r.ppl for r in measure(subject, config).of(PerplexityRecord)}
    assert by_scaling["longrope"] == pytest.approx(result["best"]["ppl"], rel=1e-6)
    assert by_scaling["none"] != pytest.approx(by_scaling["longrope"], rel=1e-3)
    with pytest.raises(ValueError, match=r"^scalings: longrope needs factors searched for"):
        scaling_for("longrope", 128, TRAINED, None, None)
    with pytest.raises(ValueError, match=rf"^scalings: longrope needs factors searched for hf:{folder}: run "
                                         rf"scripts/longrope_search.py ckpt=hf:{folder}, then pass longrope_factors="):
        EvalConfig(ckpt=f"hf:{folder}", scalings=["longrope"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")  # a run folder without longrope.json
    with pytest.raises(ValueError, match=r"^scalings: longrope needs factors searched for .*run: run scripts/"):
        EvalConfig(ckpt=str(tmp_path / "run"), scalings=["none", "longrope"])
    other = tmp_path / "other.gguf"
    other.write_bytes(b"not this model")
    with pytest.raises(ValueError, match=r"^longrope_factors: .*longrope.json was searched for .*tiny-qwen2"):
        searched_scaling(str(other), False, TRAINED, file)


def test_rope_scaling_factors_refuses_what_is_no_search_result_by_name(searched, tmp_path):
    file = searched[0].out
    (tmp_path / "other.json").write_text('{"type": "yarn"}')
    for factors, message in [(tmp_path / "absent.json", r"absent.json cannot be read as a LongRoPE search result"),
                             (tmp_path / "other.json", r"other.json is no result of scripts/longrope_search.py")]:
        with pytest.raises(ValueError, match=rf"^rope_scaling.factors: .*{message}"):
            LongRopeScaling(factors=str(factors))
    with pytest.raises(ValueError, match=r"^rope_scaling.factors: .* was searched for a trained length of 32, "
                                         r"rope_scaling.original_max_position is 64"):
        LongRopeScaling(factors=file, original_max_position=64)
    with pytest.raises(ValueError, match=r"^rope_scaling.factors: give the searched file or short_factor and "):
        LongRopeScaling(factors=file, long_factor=[2.0] * 8)


def test_the_harness_reads_the_model_with_its_searched_factors(searched):
    pytest.importorskip("lm_eval")
    from minillm.eval import harness

    settings, result, folder, _ = searched
    lm = harness.MiniLLM(ckpt=f"hf:{folder}", scaling="longrope", longrope_factors=settings.out, device="cpu",
                         precision="float32")
    assert lm.max_length == 128 and lm.scaling.long_factor == result["long_factor"]  # the searched target
    with pytest.raises(ValueError, match=r"^longrope_factors: factors for scaling=longrope, not yarn"):
        harness.MiniLLM(ckpt=f"hf:{folder}", scaling="yarn", longrope_factors=settings.out, device="cpu")


@pytest.mark.parametrize("knobs, message", [
    ({"factor": 1.0}, r"^factor: must extend the context \(> 1\), got 1.0"),
    ({"parents": 9}, r"^parents: keeps the best of a generation: at most population=8, got 9"),
    ({"mutation_rate": 0.0}, r"^mutation_rate: must lie in \(0, 1\]"),
    ({"windows": 0}, r"^windows: must be positive, got 0"),
    ({"ckpt": None}, r"^ckpt: name one model"),
])
def test_bad_settings_are_named(knobs, message):
    with pytest.raises(ValueError, match=message):
        LongRopeSearchConfig(**{"ckpt": "-", **knobs})


def test_a_search_refuses_another_searchs_log_and_text_too_short_leaving_the_files_as_they_were(searched, tmp_path):
    settings, result, _, _ = searched
    out = Path(settings.out)
    before = {path: path.read_bytes() for path in (out, log_path(out))}
    with pytest.raises(ValueError, match=rf"^log: {log_path(out)} was written by another search: seed 0 there, 3 here"):
        run_search(dataclasses.replace(settings, seed=3))
    with pytest.raises(ValueError, match=r"^log: .* was written by another search: tokens_sha256 "):
        run_search(dataclasses.replace(settings, skip_tokens=100))  # other tokens than the evaluation's first ones
    with pytest.raises(ValueError, match=r"^fitness_length: no held-out document of .*tiny-qwen2 has 100001 tokens"):
        run_search(dataclasses.replace(settings, fitness_length=100000, out=str(tmp_path / "x.json")))
    assert {path: path.read_bytes() for path in before} == before and not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_the_script_searches_and_refuses_in_one_line(searched, tmp_path):
    """The command a user runs: a search to its result file with a line per candidate; a bad setting one line, exit 2."""
    _, _, folder, text = searched
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}

    def script(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "scripts/longrope_search.py", f"ckpt=hf:{folder}",
                               f"data.path={text}", f"data.cache_dir={tmp_path / 'cache'}", *overrides],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    out = tmp_path / "found" / "longrope.json"
    done = script(f"out={out}", "population=4", "parents=2", "generations=1", "precision=float32")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["evaluations"] == 6 and log_path(out).is_file()
    assert f"factors in {out}" in done.stdout and "candidate 5 (generation 1" in done.stdout + done.stderr
    refused = script("parents=9")
    assert refused.returncode == 2 and refused.stderr == "error: parents: keeps the best of a generation: at most " \
                                                         "population=8, got 9\n"


@pytest.mark.slow
def test_a_run_of_ours_is_searched_on_its_validation_documents_into_its_folder(tiny_runs, tmp_path):
    """A trained run (the session's tiny sweep, copied): the result lands in the run folder, where the evaluation
    finds it by default; the fitness equals perplexity_at_length of the run's own validation windows."""
    import shutil

    from minillm.eval.perplexity import evaluation_tokens, perplexity_at_length
    from minillm.eval.sources import trained_subject
    from minillm.runs import find_runs
    from test_eval_script import SESSION_CACHE

    run = shutil.copytree(tiny_runs["complex"], tmp_path / "run")
    settings = LongRopeSearchConfig(ckpt=str(run), data=DataConfig(cache_dir=str(SESSION_CACHE[0])), population=4,
                                    parents=2, generations=1, precision="float32")
    out, result = run_search(settings)
    assert out == run / "longrope.json" and log_path(out).parent == run
    assert result["model"] == model_identity(str(find_runs(run)[0].checkpoint))
    subject = trained_subject(find_runs(run, settings.data.cache_dir)[0], torch.device("cpu"))
    found = subject_longrope(subject, None)  # no longrope_factors: the run folder's own
    assert found.long_factor == result["long_factor"] and found.original == 32
    tokens = evaluation_tokens(subject.documents, 128, 1)
    measured = perplexity_at_length(subject.model, tokens, 128, scaling=found, batch_size=1)
    assert measured.ppl == pytest.approx(result["best"]["ppl"], rel=1e-6)


def test_help_lists_every_setting_without_loading_torch():
    done = subprocess.run([sys.executable, "-X", "importtime", "scripts/longrope_search.py", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(f"  {f.name}=" in done.stdout for f in dataclasses.fields(LongRopeSearchConfig) if f.name != "data")
    assert "data=sotu" in done.stdout and "  data.val_fraction=0.05" in done.stdout
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "minillm.help" in imported and "torch" not in imported
