"""init_from= an imported model (hf:<folder>, a .gguf file): the run starts from transformers' own logits with the
checkpoint's tokenizer and architecture, trains with PoSE under a scaling, resumes bit for bit without the source,
records the source, and refuses a bad source or a contradicting override in one line, leaving the source as it was."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hydra import compose, initialize_config_dir
from tokenizers import Tokenizer

from minillm.cli import register_configs
from minillm.interop.pretrained import model_config
from minillm.model.transformer import Transformer
from minillm.positions.scaling import Scaling, YarnScaling
from minillm.registry import to_run_config
from minillm.runs import CheckpointError, find_runs, load_checkpoint
from minillm.train.finetune import KEPT, from_source, load_source, load_weights
from minillm.train.run import train
from minillm.train.task import LanguageModelTask
from test_pretrained import ATOL, family_config, ids, random_hf, save_with_tokenizer

REPO = Path(__file__).resolve().parents[1]
# A few PoSE steps under YaRN ×4: 16-token windows carrying positions up to 4 × 32 (the checkpoints' pretraining
# length, max_position_embeddings=32 in test_pretrained.SHAPE).
POSE = ["positions=pose", "rope_scaling=yarn", "rope_scaling.factor=4", "model.context_length=16"]
QUICK = ["logger=csv", "data.batch_size=2", "data.val_windows=2", "trainer.precision=32-true",
         "trainer.peak_flops=1e12", "trainer.val_check_interval=2", "trainer.checkpoint_every_n_steps=2", "trainer.log_every_n_steps=1",
         "optim.warmup_steps=1", "optim.lr=1e-3"]


def digest(path: Path) -> dict:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def composed(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """30 short documents of plain words: prose the byte-level tokenizers of the checkpoints can read."""
    words = "the river model token window rope angle train loss value cache folder sweep layer head".split()
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": f"Document {i}. " + " ".join(rng.choice(words) for _ in range(60))})
                            + "\n" for i in range(30)))
    return path


def checkpoint(family: str, folder: Path, **config):
    """A random transformers checkpoint of `family` saved in `folder` with its tokenizer; the HF model."""
    hf = random_hf(family_config(family, **config))
    save_with_tokenizer(hf, folder)
    return hf


def run_args(init_from: str, corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"init_from={init_from}", f"data.path={corpus}", f"data.cache_dir={corpus.parent / 'cache'}", *QUICK,
            f"hydra.run.dir={run_dir}", *extra]


def train_in_process(args: list[str], run_dir: Path) -> dict:
    """train() as scripts/train.py calls it (the overrides a resume checks are the command line's)."""
    overrides = [a for a in args if not a.startswith("hydra.")]
    run_dir.mkdir(parents=True, exist_ok=True)
    return train(composed(*overrides), run_dir, overrides)


# ----------------------------------------------------------------------------------------------
# The model a run starts from: the checkpoint's, logit for logit


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_a_run_starts_from_the_checkpoints_weights_and_architecture(family, tmp_path, corpus):
    """The step-0 model run.py builds (the task's, after load_weights) computes transformers' logits, and under the
    run's YaRN those of transformers' YaRN model of the same weights; everything the weights fix is the source's."""
    hf = checkpoint(family, tmp_path / family, rms_norm_eps=1e-5)
    before = digest(tmp_path / family)
    overrides = run_args(f"hf:{tmp_path / family}", corpus, tmp_path / "run", *POSE,
                         f"tokenizer.path={tmp_path / family / 'tokenizer.json'}")  # the model's own: accepted
    run = to_run_config(composed(*overrides))
    source = load_source(run.init_from)
    tuned = from_source(run, source, overrides, tmp_path / "run" / "tokenizer.json")

    expected = model_config(hf.config)
    assert all(getattr(tuned.model, name) == getattr(expected, name) for name in KEPT)
    assert (tuned.model.qkv_bias, tuned.model.qk_norm, tuned.model.norm_eps) == (family == "qwen2", family == "qwen3", 1e-5)
    assert tuned.model.rope == expected.rope and tuned.model.rope.variant == "rotate_half" and tuned.model.rope.theta == 500
    assert tuned.model.context_length == 16 and tuned.model.rope_scaling == YarnScaling(factor=4.0, original_max_position=32)
    assert tuned.sampler.target_length == 128  # PoSE reaches the scaling's extended length: 32 × 4
    assert tuned.tokenizer.path == str(tmp_path / "run" / "tokenizer.json")

    randomized = [*overrides, "positions=randomized"]
    assert from_source(to_run_config(composed(*randomized)), source, randomized,
                       tmp_path / "tokenizer.json").sampler.max_position == 128  # its reach too

    task = LanguageModelTask(tuned.model.to_dict(), dataclasses.asdict(tuned.optim),
                             positions=dataclasses.asdict(tuned.sampler), seed=tuned.seed)
    load_weights(task.model, source)
    assert source.state == {}  # training holds one copy of the weights
    idx = ids(40)
    with torch.no_grad():
        unscaled = Transformer(dataclasses.replace(tuned.model, rope_scaling=Scaling()))  # the same weights
        unscaled.load_state_dict(task.model.state_dict())
        assert float((unscaled(idx) - hf(idx).logits).abs().max()) < ATOL
        yarn = {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "original_max_position_embeddings": 32}
        hf_yarn = random_hf(family_config(family, rms_norm_eps=1e-5, rope_parameters=yarn, max_position_embeddings=128))
        hf_yarn.load_state_dict(hf.state_dict())
        assert float((task.model(idx) - hf_yarn(idx).logits).abs().max()) < ATOL

    record = source.record()
    assert record == {"init_from": f"hf:{tmp_path / family}", "path": str((tmp_path / family).resolve()),
                      "format": "transformers", "architecture": family, "context_length": 32,
                      "sha256": {"model.safetensors": hashlib.sha256(
                          (tmp_path / family / "model.safetensors").read_bytes()).hexdigest()}}
    assert digest(tmp_path / family) == before


def test_a_gguf_file_starts_a_run_with_its_weights_and_tokenizer(tmp_path, corpus):
    """init_from=<file>.gguf (written by minillm's GGUF export from a transformers checkpoint): the step-0 model
    computes transformers' logits, the run reads text with the file's tokenizer, the record names the file."""
    from minillm.interop.gguf_export import write_gguf
    from minillm.interop.pretrained import PretrainedSource

    hf = checkpoint("llama", tmp_path / "llama")
    folder = PretrainedSource.parse(f"hf:{tmp_path / 'llama'}").load()
    gguf = write_gguf(folder.model, folder.tokenizer, tmp_path / "tiny.gguf")
    before = digest(gguf)
    overrides = run_args(str(gguf), corpus, tmp_path / "run", *POSE)
    source = load_source(str(gguf))
    tuned = from_source(to_run_config(composed(*overrides)), source, overrides, tmp_path / "tokenizer.json")
    model = Transformer(dataclasses.replace(tuned.model, rope_scaling=Scaling()))
    load_weights(model, source)
    with torch.no_grad():
        assert float((model(ids(32)) - hf(ids(32)).logits).abs().max()) < ATOL
    text = "Document 3. the river model\n"
    assert Tokenizer.from_str(source.tokenizer_json()).encode(text, add_special_tokens=False).ids == \
        folder.tokenizer.encode(text, add_special_tokens=False).ids
    assert source.record() == {"init_from": str(gguf), "path": str(gguf.resolve()), "format": "gguf",
                               "architecture": "llama", "context_length": 32,
                               "sha256": {"tiny.gguf": hashlib.sha256(gguf.read_bytes()).hexdigest()}}
    assert digest(gguf) == before


def test_a_scaled_checkpoint_keeps_its_scaling_unless_the_run_names_one(tmp_path, corpus):
    """A model published with a scaling (Llama 3.1's llama3) is trained as published when the command line names
    no rope_scaling: the step-0 model computes transformers' logits past the pretraining length."""
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    hf = checkpoint("llama", tmp_path / "llama3", rope_parameters=llama3)
    overrides = run_args(f"hf:{tmp_path / 'llama3'}", corpus, tmp_path / "run", "model.context_length=16")
    source = load_source(f"hf:{tmp_path / 'llama3'}")
    tuned = from_source(to_run_config(composed(*overrides)), source, overrides, tmp_path / "tokenizer.json")
    assert tuned.model.rope_scaling == model_config(hf.config).rope_scaling
    assert tuned.model.rope_scaling.original_max_position == 8 and tuned.model.context_length == 16
    model = Transformer(tuned.model)
    load_weights(model, source)
    with torch.no_grad():
        assert float((model(ids(48)) - hf(ids(48)).logits).abs().max()) < ATOL
    named = [*overrides, "rope_scaling=linear", "rope_scaling.factor=2"]
    source = load_source(f"hf:{tmp_path / 'llama3'}")
    scaled = from_source(to_run_config(composed(*named)), source, named, tmp_path / "tokenizer.json").model.rope_scaling
    assert (scaled.name, scaled.factor, scaled.original_max_position) == ("linear", 2.0, 8)  # from the pretraining length


def test_longrope_factors_searched_for_the_source_fit_its_shape_not_the_model_groups(tmp_path, corpus):
    """A search result for the imported model (head_dim 16: 8 factors) starts its fine-tuning, though the composed
    model group's head_dim (32) has 16 frequencies; factors for another shape are refused by name."""
    checkpoint("llama", tmp_path / "llama")
    factors = [1.0 + i / 4 for i in range(8)]
    result = {"type": "longrope", "factor": 4.0, "original_max_position": 32, "short_factor": [1.0] * 8,
              "long_factor": factors}
    (tmp_path / "longrope.json").write_text(json.dumps(result))
    overrides = run_args(f"hf:{tmp_path / 'llama'}", corpus, tmp_path / "run", "model.context_length=16",
                         "rope_scaling=longrope", f"rope_scaling.factors={tmp_path / 'longrope.json'}")
    tuned = from_source(to_run_config(composed(*overrides)), load_source(f"hf:{tmp_path / 'llama'}"), overrides,
                        tmp_path / "tokenizer.json")
    assert tuned.model.rope_scaling.long_factor == factors and tuned.model.head_dim == 16
    (tmp_path / "longrope.json").write_text(json.dumps({**result, "long_factor": factors * 2,
                                                        "short_factor": [1.0] * 16}))
    with pytest.raises(ValueError, match=r"^rope_scaling.factors: .* holds 16 factors, this model has rotary_dim/2 = 8"):
        from_source(to_run_config(composed(*overrides)), load_source(f"hf:{tmp_path / 'llama'}"), overrides,
                    tmp_path / "tokenizer.json")


# ----------------------------------------------------------------------------------------------
# Training, resuming, recording


def test_a_pose_run_records_its_source_and_resumes_bit_exactly_without_it(tmp_path, corpus):
    """A run stopped after its step-2 checkpoint (its folder as a kill leaves it) and resumed (hydra.run.dir=<run>
    ckpt_path=last) with the source moved away ends with the weights of the run trained straight through to step 4;
    both record the source as it was read."""
    checkpoint("llama", tmp_path / "llama")
    before = digest(tmp_path / "llama")
    init_from = f"hf:{tmp_path / 'llama'}"
    args = [*POSE, "trainer.max_steps=4"]
    whole = train_in_process(run_args(init_from, corpus, tmp_path / "whole", *args), tmp_path / "whole")
    assert digest(tmp_path / "llama") == before

    shutil.copytree(tmp_path / "whole", tmp_path / "part")  # then what a kill after the step-2 save leaves
    (tmp_path / "part" / "summary.json").unlink()
    for saved in (tmp_path / "part" / "checkpoints").iterdir():
        if saved.name != "step-000002.ckpt":
            saved.unlink()
    shutil.copy(tmp_path / "part" / "checkpoints" / "step-000002.ckpt", tmp_path / "part" / "checkpoints" / "last.ckpt")
    (tmp_path / "llama").rename(tmp_path / "moved")  # a resume reads the run folder alone
    resumed = train_in_process(run_args(init_from, corpus, tmp_path / "part", *args, "ckpt_path=last"), tmp_path / "part")

    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert not torch.equal(a["state_dict"]["model.embed.weight"], load_checkpoint(
        tmp_path / "whole" / "checkpoints" / "step-000002.ckpt")["state_dict"]["model.embed.weight"])  # it trained
    assert a["hyper_parameters"]["positions"] == {"sampler": "pose", "chunks": 2, "target_length": 128}
    assert a["hyper_parameters"]["model"]["rope"]["variant"] == "rotate_half"

    # Continued from the step-2 checkpoint in a folder of its own, a run records the same source.
    other = train_in_process(run_args(init_from, corpus, tmp_path / "other", *args,
                                      f"ckpt_path={tmp_path / 'whole' / 'checkpoints' / 'step-000002.ckpt'}"),
                             tmp_path / "other")
    c = load_checkpoint(tmp_path / "other" / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(a["state_dict"][k], c[k]) for k in a["state_dict"])

    sha = hashlib.sha256((tmp_path / "moved" / "model.safetensors").read_bytes()).hexdigest()
    expected = {"init_from": init_from, "path": str(tmp_path / "llama"), "format": "transformers",
                "architecture": "llama", "context_length": 32, "sha256": {"model.safetensors": sha}}
    for run, summary in (("whole", whole), ("part", resumed), ("other", other)):
        assert summary["init_from_source"] == expected
        assert json.loads((tmp_path / run / "init_from.json").read_text()) == expected
    # The run folder's tokenizer.json is the checkpoint's: it encodes text as transformers' tokenizer does.
    ours = Tokenizer.from_file(str(tmp_path / "whole" / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "moved")
    text = "Document 3. the river model ünïcode\n"
    assert ours.encode(text, add_special_tokens=False).ids == theirs.encode(text, add_special_tokens=False)
    assert ours.get_vocab_size() < a["hyper_parameters"]["model"]["vocab_size"] == 320  # an embedding past it is kept
    # ... which evaluation reads with the tokenizer the run trained with (its data fingerprint), and refuses with another
    from minillm.eval.config import EvalConfig
    from minillm.eval.loop import evaluate_run
    from minillm.eval.perplexity import PerplexityRecord

    config = EvalConfig(ckpt=str(tmp_path / "whole"), lengths=[16], scalings=["none"], passkey_trials=0,
                        tail_loss=False, max_documents=2, precision="float32")
    (run,) = find_runs(tmp_path / "whole", str(corpus.parent / "cache"))
    assert evaluate_run(run, config, torch.device("cpu")).of(PerplexityRecord)[0].ppl > 1
    other = Tokenizer.from_str(ours.to_str())
    other.enable_truncation(1000)  # the same tokens, another file: not what the run trained with
    other.save(str(tmp_path / "whole" / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="the run folder's tokenizer is not the checkpoint's"):
        evaluate_run(find_runs(tmp_path / "whole", str(corpus.parent / "cache"))[0], config, torch.device("cpu"))
    (tmp_path / "whole" / "tokenizer.json").write_text(ours.to_str())

    # The run is a source like any other: a later init_from of it keeps its architecture, tokenizer and vocabulary.
    again = train_in_process(run_args(str(tmp_path / "whole"), corpus, tmp_path / "again", "model.context_length=16",
                                      "trainer.max_steps=1"), tmp_path / "again")
    assert again["init_from_source"]["run"] == "whole"
    model = load_checkpoint(tmp_path / "again" / "checkpoints" / "last.ckpt")["hyper_parameters"]["model"]
    assert model == {**a["hyper_parameters"]["model"], "rope_scaling": model["rope_scaling"]}
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (tmp_path / "whole" / "tokenizer.json").read_bytes()


# ----------------------------------------------------------------------------------------------
# Refusals: one line naming the culprit, the source untouched


def bad_source(case: str, tmp_path: Path) -> tuple[Path, str, list[str], str]:
    """(the source's files, init_from, extra overrides, the message's start) for one bad input."""
    folder = tmp_path / "model"
    if case == "unsupported":
        checkpoint("llama", folder, hidden_act="gelu")
        return folder, f"hf:{folder}", [], f"init_from: {folder}: hidden_act='gelu' in this llama config is not supported"
    checkpoint("qwen2", folder)
    if case == "missing":
        return folder, f"hf:{tmp_path / 'absent'}", [], f"init_from: {tmp_path / 'absent'} does not exist"
    if case == "truncated":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:3000])
        return folder, f"hf:{folder}", [], f"init_from: {weights} is truncated"
    if case == "corrupt_gguf":
        fake = tmp_path / "model.gguf"
        fake.write_bytes(b"GGUF" + bytes(range(256)) * 4)
        return fake, str(fake), [], f"init_from: {fake} is corrupt or truncated"
    if case == "shape":
        return folder, f"hf:{folder}", ["model.d_model=128"], f"model.d_model: init_from=hf:{folder} holds a model with 64"
    if case == "norm_eps":
        return folder, f"hf:{folder}", ["model.norm_eps=1e-3"], f"model.norm_eps: init_from=hf:{folder} holds a model with 1e-06"
    if case == "theta":
        return folder, f"hf:{folder}", ["rope=rotate_half", "rope.theta=10000"], \
            f"rope.theta: init_from=hf:{folder} was pretrained with 500.0, this run asks for 10000.0"
    if case == "encoding":
        return folder, f"hf:{folder}", ["rope=alibi"], f"rope.variant: init_from=hf:{folder} was trained with 'rotate_half'"
    assert case == "tokenizer"
    other = tmp_path / "other.json"
    text = json.loads((folder / "tokenizer.json").read_text())
    text["model"]["vocab"]["zzzz_extra"] = len(text["model"]["vocab"])
    other.write_text(json.dumps(text))
    return folder, f"hf:{folder}", [f"tokenizer.path={other}"], f"tokenizer.path={str(other)!r}: not the tokenizer of"


@pytest.mark.parametrize("case", ["unsupported", "missing", "truncated", "corrupt_gguf", "shape", "norm_eps", "theta",
                                  "encoding", "tokenizer"])
def test_a_bad_source_or_a_contradiction_is_refused_naming_it(case, tmp_path, corpus):
    files, init_from, extra, message = bad_source(case, tmp_path)
    before = digest(files)
    with pytest.raises((CheckpointError, ValueError)) as raised:
        train_in_process(run_args(init_from, corpus, tmp_path / "run", *extra, "trainer.max_steps=1"), tmp_path / "run")
    assert str(raised.value).startswith(message), str(raised.value)
    assert "\n" not in str(raised.value)
    assert digest(files) == before
    assert not any((tmp_path / "run").iterdir())  # refused before anything was written


@pytest.mark.slow
def test_the_script_refuses_a_hub_model_it_cannot_reach_offline(tmp_path, corpus):
    """The command a user runs: exit 2, one line on stderr naming init_from and the hub id, no run folder left."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HF_"))}
    env = {**clean, "HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "scripts/train.py", *run_args("hf:nobody/no-such-model", corpus,
                                                                         tmp_path / "run", "trainer.max_steps=1")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: init_from: the config of hub model nobody/no-such-model could not be read"), last
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists() or not any(p.suffix != ".log" for p in (tmp_path / "run").iterdir())
