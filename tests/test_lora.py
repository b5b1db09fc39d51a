"""LoRA fine-tuning (minillm.train.lora): the adapters the model really computes with, peft's own merge, what a
training step moves, and a LoRA run of scripts/train.py that resumes bit for bit and reads back as one merged model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minillm.model.config import ModelConfig
from minillm.model.transformer import Transformer
from minillm.registry import ConfigError
from minillm.runs import CheckpointError, find_runs, load_checkpoint, merge_adapters, model_weights
from minillm.train.config import OptimConfig
from minillm.train.lora import LoraConfig, apply_adapters
from minillm.train.task import LanguageModelTask
from test_finetune import env, finetune, source  # noqa: F401 (the tiny source run, shared with test_finetune)

ALL = ["qkv", "proj", "up", "down"]
REPO = Path(__file__).resolve().parents[1]
PATHS = {"qkv": "attn.qkv", "proj": "attn.proj", "up": "ffn.up", "down": "ffn.down"}


def tiny(**changes) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 50, "context_length": 16, "d_model": 32, "n_layers": 2, "n_heads": 2,
                          **changes})


def adapted(cfg: ModelConfig, lora: LoraConfig) -> Transformer:
    """A Transformer with lora's adapters, B drawn at random (peft starts it at zero: the update would be 0)."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    apply_adapters(model, lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    return model.eval()


@pytest.mark.parametrize("changes", [{}, {"ffn": "gelu", "bias": True, "qk_norm": True}], ids=["swiglu", "gelu-bias"])
def test_the_merged_model_is_the_adapter_forward_and_peft_merge_and_unload(changes):
    """Adapters on every projection, the fused q|k|v and gate|up included: the model's logits with them equal a
    plain Transformer holding W + (alpha/r)·B·A (runs.merge_adapters) and peft's own merge_and_unload."""
    import peft

    cfg, lora = tiny(**changes), LoraConfig(rank=4, alpha=6.0, targets=ALL)
    model = adapted(cfg, lora)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.context_length))
    plain = Transformer(cfg)
    plain.load_state_dict(merge_adapters(model.state_dict(), lora.alpha / lora.rank))
    # peft's own layers on the same weights, configured by hand here, merged by peft
    theirs = peft.get_peft_model(Transformer(cfg), peft.LoraConfig(
        r=4, lora_alpha=6.0, target_modules=[f"blocks.{i}.{PATHS[t]}" for i in range(cfg.n_layers) for t in ALL]))
    theirs.base_model.model.load_state_dict(model.state_dict())
    unmerged = theirs(x)  # peft's own adapted layers, before the merge
    merged = theirs.merge_and_unload().eval()
    base = Transformer(cfg)
    base.load_state_dict(merge_adapters(model.state_dict(), 0.0))  # W alone
    with torch.no_grad():
        ours, by_us, by_peft = model(x), plain(x), merged(x)
        assert (ours - base(x)).abs().max() > 0.1  # the adapters move the logits
    torch.testing.assert_close(ours, by_us, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, by_peft, atol=1e-5, rtol=0)
    torch.testing.assert_close(unmerged, by_peft, atol=1e-5, rtol=0)  # the model calls the adapted layers
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in merged.state_dict().items()}


def task_with(lora: LoraConfig, cfg: ModelConfig, compile: bool = False) -> LanguageModelTask:
    task = LanguageModelTask(cfg.to_dict(), dataclasses.asdict(OptimConfig(lr=1e-2, warmup_steps=1)), compile=compile,
                             lora=dataclasses.asdict(lora))
    task.trainer = SimpleNamespace(precision="32-true", max_steps=10)
    return task


@pytest.mark.parametrize("plus", [False, True], ids=["lora", "lora+"])
def test_a_training_step_moves_only_the_adapters_and_what_lora_plus_adds(plus):
    """Two AdamW steps through the task's optimizer: every frozen tensor bit-identical, every adapter moved, and
    with LoRA+ (LongLoRA, arXiv:2309.12307) the norms (QK-norm's too), the embedding and the head as well."""
    cfg = tiny(qk_norm=True, tie_embeddings=False)
    lora = LoraConfig(rank=2, targets=["qkv", "down"], train_norms=plus, train_embeddings=plus)
    task = task_with(lora, cfg)
    torch.manual_seed(0)
    task.configure_model()
    task.configure_model()  # Lightning may call it again: the adapters go on once
    optimizer = task.configure_optimizers()["optimizer"]
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    x = torch.randint(0, cfg.vocab_size, (4, cfg.context_length))
    for _ in range(2):
        optimizer.zero_grad()
        task.model.loss(x, x.roll(-1, 1)).backward()
        optimizer.step()
    after = task.model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    adapters = {k for k in before if ".lora_" in k}
    extra = {k for k in before if "norm" in k or k in ("embed.weight", "head.weight")} if plus else set()
    assert len(adapters) == 2 * 2 * cfg.n_layers and extra.isdisjoint(adapters)
    assert moved == adapters | extra
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in task.model.parameters() if p.requires_grad}
    counts = task.parameter_counts()
    assert counts["trainable_parameters"] == sum(after[k].numel() for k in adapters | extra)
    assert counts["total_parameters"] == sum(v.numel() for v in after.values())


def test_the_adapters_go_on_before_the_blocks_compile_and_compiled_blocks_train_them(monkeypatch):
    """trainer.compile with LoRA: configure_model puts the adapters on, then compiles the blocks, whose graphs
    read the adapted weights: loss and gradients equal the eager model's (aot_eager: the tracing, without
    inductor's C++ build, which takes half a minute here; inductor was checked by hand)."""
    original = Transformer.compile_blocks
    monkeypatch.setattr(Transformer, "compile_blocks", lambda self: original(self, backend="aot_eager"))
    cfg, lora = tiny(n_layers=1), LoraConfig(rank=4, targets=ALL)
    task = task_with(lora, cfg, compile=True)
    torch.manual_seed(0)
    eager = Transformer(cfg)
    task.model.load_state_dict(eager.state_dict())
    apply_adapters(eager, lora)
    task.configure_model()
    task.model.load_state_dict(eager.state_dict())
    for model in (task.model, eager):
        torch.manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.2)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.context_length))
    losses = [model.loss(x, x) for model in (task.model, eager)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=0)
    grads = [{n: p.grad for n, p in model.named_parameters() if p.requires_grad} for model in (task.model, eager)]
    assert grads[0].keys() == grads[1].keys() and all(".lora_" in n for n in grads[0])
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=0)


def test_lora_settings_that_make_no_sense_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"^lora.rank=8: adapters fine-tune pretrained weights.*init_from="):
        LoraConfig(rank=8).check_source(None)
    LoraConfig(rank=8).check_source("outputs/run")
    LoraConfig().check_source(None)  # full training
    assert LoraConfig(rank=8).alpha == 16.0 and LoraConfig(rank=8, alpha=8).scale == 1.0


def test_a_checkpoint_whose_adapters_do_not_merge_names_the_file():
    entries = {"model.blocks.0.attn.qkv.base_layer.weight": torch.zeros(6, 2),
               "model.blocks.0.attn.qkv.lora_A.default.weight": torch.zeros(1, 2)}  # and no lora_B
    checkpoint = {"state_dict": entries, "hyper_parameters": {"lora": {"rank": 1, "alpha": 2.0}}}
    with pytest.raises(CheckpointError, match=r"^checkpoint x.ckpt: its LoRA adapters do not merge \(KeyError"):
        model_weights(checkpoint, "x.ckpt")


LORA_RUN = ["lora.rank=4", "lora.targets=[qkv,proj,up]", "lora.train_norms=true", "model.context_length=32",
            "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2", "trainer.val_check_interval=2",
            "optim.lr=1e-2", "optim.warmup_steps=1", "trainer.precision=32-true"]


def train_in_process(args: list[str], run_dir: Path) -> dict:
    """train() as scripts/train.py calls it, in this process (peft and Lightning are imported already)."""
    from hydra import compose, initialize_config_dir

    from minillm.cli import register_configs
    from minillm.train.run import train

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=args)
    run_dir.mkdir(parents=True)
    return train(cfg, run_dir, args)


@pytest.mark.slow
def test_a_lora_run_resumes_bit_exact_and_reads_back_as_one_merged_model(env, source, tmp_path):  # noqa: F811
    """scripts/train.py init_from=<run> lora.rank=4: resumed from its step-2 checkpoint in another folder it ends
    with the same adapters and frozen weights, bit for bit; the run read back (what evaluation, export and a
    further init_from load) is a plain Transformer whose logits equal the adapter forward of the checkpoint."""
    whole = finetune(env, source, tmp_path / "whole", *LORA_RUN)
    assert whole.returncode == 0, whole.stderr[-3000:]
    step_2 = tmp_path / "whole" / "checkpoints" / "step-000002.ckpt"
    train_in_process([f"init_from={source}", "logger=csv", "data.batch_size=8", "data.val_windows=4",
                      f"data.cache_dir={source.parent / 'cache'}", *LORA_RUN, f"ckpt_path={step_2}"],
                     tmp_path / "resumed")
    last = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    a, b = last["state_dict"], load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "model.blocks.0.attn.qkv.lora_B.default.weight" in a and "model.blocks.0.ffn.down.weight" in a
    assert last["hyper_parameters"]["lora"]["alpha"] == 8.0  # alpha = 2r, recorded as the number used
    original = load_checkpoint(source / "checkpoints" / "best.ckpt")["state_dict"]
    base = {k.replace(".base_layer.", "."): v for k, v in a.items() if ".lora_" not in k}
    assert base.keys() == original.keys()
    assert {k for k in original if not torch.equal(original[k], base[k])} == {k for k in original if "norm" in k}
    trained = sum(v.numel() for k, v in a.items() if ".lora_" in k or "norm" in k)
    assert f"training {trained} of " in (tmp_path / "whole" / "train.log").read_text()

    hparams = last["hyper_parameters"]
    task = LanguageModelTask(**hparams)
    task.configure_model()
    task.load_state_dict(a)
    run = find_runs(tmp_path / "whole", str(source.parent / "cache"))[0]
    model = run.load_model()
    assert type(model) is Transformer and not any(".lora_" in k or "base_layer" in k for k in model.state_dict())
    x = torch.randint(0, model.cfg.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(x), task.model.eval()(x), atol=1e-5, rtol=0)

    from minillm.eval.config import EvalConfig
    from minillm.eval.loop import evaluate_run
    from minillm.eval.perplexity import PerplexityRecord

    config = EvalConfig(ckpt=str(tmp_path / "whole"), lengths=[32], scalings=["none"], passkey_trials=0,
                        tail_loss=False, max_documents=4, precision="float32")
    record = evaluate_run(run, config, torch.device("cpu")).of(PerplexityRecord)[0]
    assert 1 < record.ppl < 300 and record.tokens > 0
