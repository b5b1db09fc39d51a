"""Handing a model back: a run (or an imported Llama / Qwen2 / Qwen3) exported to a transformers folder and to a GGUF
file computes our logits when transformers loads it, its tokenizer encodes the same ids, and what the target cannot
express is refused in one line before the output is touched."""

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from minillm.interop.gguf_export import gguf_vocabulary, write_gguf
from minillm.interop.handback import export
from minillm.interop.pretrained import from_hf
from minillm.model.config import ModelConfig
from minillm.model.transformer import Transformer
from minillm.positions.rotary import RotaryConfig

REPO = Path(__file__).resolve().parents[1]
VOCAB = 320
TRAINED = 16  # the pretraining length the scalings extend
LONG = 40  # past it, where a scaling changes the logits
ATOL = 1e-4
EOS = "<|endoftext|>"
TEXTS = ["def f(x):\n    return x + 1\n", "import os\nprint(os.sep) # 1234 héllo\n", "Call me Ishmael. Some years ago"]
SAMPLES = ["Call me Ishmael, 2024 times.\n", "def g(y): return y * 31 # ünïcode", f"one{EOS}two  three\n\n"]
# Qwen2's pre-tokenizer split, as its tokenizer.json (Qwen/Qwen2-0.5B, pre_tokenizer.pretokenizers[0].pattern) has it.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": TRAINED}
LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
PLAIN = {"rope_type": "default", "rope_theta": 500.0}


def byte_bpe(split: str | None = None) -> Tokenizer:
    """A byte-level BPE with <|endoftext|>: GPT-2's split, or a regex split then bytes (Qwen2's shape)."""
    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    tokenizer.pre_tokenizer = byte_level if split is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tokenizer


def hf_config(family: str, rope: dict, **overrides):
    """A tiny transformers config of the family (Qwen3 with GGUF's head size, 128, wider than hidden/heads)."""
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=TRAINED * (4 if rope["rope_type"] == "yarn" else 1),
                  rms_norm_eps=1e-6, rope_parameters=rope, tie_word_embeddings=family != "llama", **overrides)
    if family == "llama":
        return transformers.LlamaConfig(**fields)
    if family == "qwen2":
        return transformers.Qwen2Config(use_sliding_window=False, **fields)
    return transformers.Qwen3Config(use_sliding_window=False, **{**fields, "num_attention_heads": 2,
                                                                 "num_key_value_heads": 1, "head_dim": 128})


def imported(family: str, rope: dict, seed: int = 0) -> Transformer:
    """A random transformers checkpoint of the family (biases and norm gains too) imported as ours, as a fine-tuning
    run starts from one."""
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(family, rope), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("norm.weight") else
                    0.3 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) * 1.5 * p.shape[-1] ** -0.5)
    return from_hf(hf)


def save_run(folder: Path, model: Transformer, tokenizer: Tokenizer) -> Path:
    """A run folder as training leaves it: checkpoints/last.ckpt, config.yaml, tokenizer.json."""
    (folder / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model": model.cfg.to_dict()}, "global_step": 3},
               folder / "checkpoints" / "last.ckpt")
    (folder / "config.yaml").write_text("seed: 0\n")
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def ids(length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(1))


def gap(ours: Transformer, hf, idx: torch.Tensor) -> float:
    with torch.no_grad():
        return float((ours(idx) - hf(idx).logits).abs().max())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@pytest.mark.parametrize("family, rope", [("llama", PLAIN), ("llama", YARN), ("qwen2", LINEAR), ("qwen3", YARN)],
                         ids=["llama", "llama-yarn", "qwen2-linear", "qwen3-yarn"])
def test_folder_round_trip(tmp_path, family, rope):
    """transformers' own load of the folder: the family it came as, the rope parameters, our logits past the
    trained length, and the tokenizer's ids and end of sequence."""
    model = imported(family, rope)
    tokenizer = byte_bpe()
    run = save_run(tmp_path / "run", model, tokenizer)
    out = export(str(run), "hf", str(tmp_path / "out"), eos_token=EOS)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == CLASSES[family]
    assert hf.config.rope_parameters["rope_type"] == rope["rope_type"]
    assert gap(model, hf, ids(LONG)) < ATOL
    if rope is YARN:  # the check has teeth: the scaling moves these logits far beyond ATOL
        plain = Transformer(ModelConfig.from_dict({**model.cfg.to_dict(), "rope_scaling": {"type": "none"}}))
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert float((plain(ids(LONG)) - model(ids(LONG))).abs().max()) > 100 * ATOL
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    assert loaded.eos_token == EOS and hf.config.eos_token_id == tokenizer.token_to_id(EOS)
    for text in SAMPLES:
        assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(text).ids


def test_folder_is_replaced_whole(tmp_path):
    model, tokenizer = imported("llama", PLAIN), byte_bpe()
    out = tmp_path / "out"
    export(str(save_run(tmp_path / "run", model, tokenizer)), "hf", str(out), eos_token=EOS)
    (out / "stale.txt").write_text("from before")
    export(str(tmp_path / "run"), "hf", str(out), dtype="bf16", eos_token=EOS)
    assert not (out / "stale.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]
    assert transformers.AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


@pytest.mark.parametrize("family, scaled", [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", True)],
                         ids=["llama", "llama-ntk", "qwen2", "qwen3-ntk"])
def test_gguf_round_trip(tmp_path, family, scaled):
    """transformers' GGUF reader: our logits (float32), the same token ids; gguf's reader: llama.cpp's keys."""
    model = imported(family, PLAIN)
    if scaled:  # static NTK is plain RoPE with a larger base: the one scaling the file carries (rope.freq_base)
        model = Transformer(ModelConfig.from_dict({**model.cfg.to_dict(), "rope_scaling": {"type": "ntk",
                                                                                           "factor": 4.0}}))
        model.load_state_dict(imported(family, PLAIN).state_dict())
    tokenizer = byte_bpe(QWEN2_SPLIT if family != "llama" else None)
    run = save_run(tmp_path / "run", model, tokenizer)
    out = export(str(run), "gguf", str(tmp_path / "new" / "m.gguf"), eos_token=EOS)  # its folder made too
    hf = transformers.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    assert type(hf).__name__ == CLASSES[family]
    assert gap(model, hf, ids(LONG)) < ATOL
    loaded = transformers.AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert loaded.eos_token == EOS
    for text in SAMPLES:
        assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(text).ids

    fields = gguf.GGUFReader(out).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    theta = 500.0 * 4.0 ** (model.cfg.head_dim / (model.cfg.head_dim - 2)) if scaled else 500.0
    assert value("general.architecture") == family and value(f"{family}.context_length") == TRAINED
    assert value(f"{family}.rope.freq_base") == pytest.approx(theta, rel=1e-6)
    assert value(f"{family}.attention.head_count_kv") == model.cfg.kv_heads
    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.pre") == ("gpt-2" if family == "llama" else "qwen2")
    assert value("tokenizer.ggml.eos_token_id") == tokenizer.token_to_id(EOS) == 0
    assert value("tokenizer.ggml.token_type")[0] == 3 and value("tokenizer.ggml.token_type")[VOCAB - 1] == 5
    assert value("tokenizer.ggml.tokens")[VOCAB - 1] == f"[PAD{VOCAB - 1}]"  # past the tokenizer's 300


def test_gguf_llama_rows_are_ggml_pairs(tmp_path):
    """ggml rotates adjacent pairs (2i, 2i+1), as our `complex` layout does: llama.cpp's q and k rows are ours."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=VOCAB, context_length=TRAINED, d_model=64, n_layers=1, n_heads=4,
                                    n_kv_heads=2, rope=RotaryConfig(variant="complex"))).eval()
    path = write_gguf(model, byte_bpe(), tmp_path / "m.gguf")
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(path).tensors}
    q, k, _ = model.blocks[0].attn.qkv.weight.detach().split([64, 32, 32])
    assert torch.equal(tensors["blk.0.attn_q.weight"], q) and torch.equal(tensors["blk.0.attn_k.weight"], k)
    assert "output.weight" not in tensors  # tied: llama.cpp reads the embedding for it


@pytest.mark.parametrize("dtype, torch_dtype, kind", [("f16", torch.float16, "F16"), ("bf16", torch.bfloat16, "BF16")])
def test_gguf_half_precision(tmp_path, dtype, torch_dtype, kind):
    """Matrices rounded to dtype, norm gains in F32: the logits are those of our model with its matrices so rounded."""
    model = imported("qwen2", PLAIN)
    path = write_gguf(model, byte_bpe(QWEN2_SPLIT), tmp_path / "m.gguf", dtype=dtype, eos_token=EOS)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == kind and types["blk.0.attn_q.bias"] == types["output_norm.weight"] == "F32"
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(p.to(torch_dtype).float())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert gap(model, hf, ids(LONG)) < ATOL


REFUSED = [
    ("gguf", dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling.type='yarn'"),
    ("gguf", dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling.type='linear'"),
    ("gguf", dict(qkv_bias=True, head_size=32), "model.head_size=32"),  # qwen2's head size is hidden/heads
    ("gguf", dict(qk_norm=True), "model.head_size=16"),  # transformers' qwen3 takes 128
    ("gguf", dict(rope={"variant": "rotate_half", "rotary_dim": 8}), "rope.rotary_dim=8"),
    ("hf", dict(norm="layernorm"), "model.norm='layernorm'"),
    ("hf", dict(qkv_bias=True, qk_norm=True), "model.qkv_bias=True with model.qk_norm=True"),
    ("hf", dict(bias=True), "model.bias=True"),
    ("hf", dict(rope={"variant": "alibi"}), "rope.variant='alibi'"),
]


@pytest.mark.parametrize("format, overrides, message", REFUSED, ids=[m for _, _, m in REFUSED])
def test_refusals_name_the_setting_and_leave_the_output(tmp_path, format, overrides, message):
    cfg = ModelConfig.from_dict({**ModelConfig(vocab_size=VOCAB, context_length=TRAINED, d_model=64, n_layers=1,
                                               n_heads=4, n_kv_heads=2).to_dict(), **overrides})
    run = save_run(tmp_path / "run", Transformer(cfg), byte_bpe())
    out = tmp_path / ("old.gguf" if format == "gguf" else "old")
    if format == "gguf":
        out.write_bytes(b"the export before")
    else:
        out.mkdir()
        (out / "config.json").write_text("{}")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        export(str(run), format, str(out))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    if format == "gguf":
        assert out.read_bytes() == b"the export before"
    else:
        assert (out / "config.json").read_text() == "{}" and sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_requests_are_checked_before_anything_is_read(tmp_path):
    (tmp_path / "dir.gguf").mkdir()
    for args, message in [(("gguf", str(tmp_path / "m.bin"), "f32"), "out='.*m.bin': a GGUF file's name ends in .gguf"),
                          (("gguf", str(tmp_path / "dir.gguf"), "f32"), "is a folder: name a .gguf file"),
                          (("hf", str(tmp_path / "o"), "q4_0"),
                           r"dtype='q4_0': expected one of \['bf16', 'f16', 'f32'\]"),
                          (("gguf", "", "f32"), "out: name the folder")]:
        with pytest.raises(ValueError, match=message):
            export("no-such-run", *args)  # the request is refused before the checkpoint is looked for
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="is a folder with other files"):
        export(str(save_run(tmp_path / "run", imported("llama", PLAIN), byte_bpe())), "hf", str(tmp_path / "notes"))
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep"


def test_tokenizers_gguf_cannot_carry_are_refused():
    word_level = Tokenizer(models.WordLevel({"a": 0, EOS: 1}, unk_token=None))
    with pytest.raises(ValueError, match="tokenizer.json: a WordLevel tokenizer"):
        gguf_vocabulary(word_level, 8, EOS)
    metaspace = byte_bpe()
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(ValueError, match=r"tokenizer.json: its pre-tokenizer \(Metaspace\)"):
        gguf_vocabulary(metaspace, VOCAB, EOS)
    with pytest.raises(ValueError, match="tokenizer.json: 300 tokens, more than the model's vocab_size=64"):
        gguf_vocabulary(byte_bpe(), 64, EOS)


# ----------------------------------------------------------------------------------------------
# scripts/export.py


def script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/export.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def script_main():
    """scripts/export.py's main, run in this process (a subprocess costs seconds of imports)."""
    spec = importlib.util.spec_from_file_location("export_script", REPO / "scripts" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_script_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    main = script_main()
    for args, message in [(["ckpt=x", "format=onnx", f"out={tmp_path}/o"], "error: format='onnx': expected one of"),
                          (["ckpt=x", "format=gguf"], "error: out: missing"),
                          (["ckpt=x", "format=gguf", "out=x.gguf", "quant=q4"], "error: 'quant=q4': expected one of"),
                          (["ckpt", "format=gguf", "out=x.gguf"], "error: 'ckpt': expected one of"),
                          ([f"ckpt={tmp_path}/none", "format=hf", f"out={tmp_path}/o"],
                           f"error: ckpt: {tmp_path}/none does not exist")]:
        with pytest.raises(SystemExit) as stop:
            main(args)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(message), err
    assert list(tmp_path.iterdir()) == []
    main(["--help"])
    assert capsys.readouterr().out.startswith("Hand a model back")


def test_script_exports(tmp_path, capsys):
    model = imported("qwen2", LINEAR)
    run = save_run(tmp_path / "run", model, byte_bpe())
    script_main()([f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "format=hf", f"out={tmp_path / 'hf'}"])
    assert capsys.readouterr().out == f"hf export of {run / 'checkpoints' / 'last.ckpt'} in {tmp_path / 'hf'}\n"
    assert gap(model, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval(), ids(LONG)) < ATOL


@pytest.mark.slow
def test_script_refusal_is_one_line_and_leaves_the_file(tmp_path):
    run = save_run(tmp_path / "run", imported("llama", YARN), byte_bpe())
    out = tmp_path / "m.gguf"
    out.write_bytes(b"the export before")
    refused = script(f"ckpt={run}", "format=gguf", f"out={out}")
    assert refused.returncode == 2 and refused.stdout == "" and len(refused.stderr.splitlines()) == 1
    assert refused.stderr.startswith("error: rope_scaling.type='yarn' cannot go into a GGUF file")
    assert sha256(out) == hashlib.sha256(b"the export before").hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "run"]
