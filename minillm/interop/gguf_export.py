"""Export to a GGUF file (llama.cpp's format), unquantized, written so that transformers' GGUF reader rebuilds the
same model and tokenizer: the model as the transformers family to_hf picks, the tokenizer as llama.cpp's gpt2 BPE."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from minillm.interop.export import to_hf
from minillm.model.transformer import Transformer

if TYPE_CHECKING:  # tokenizers comes with transformers (the `interop` extra)
    import tokenizers

# dtype= -> (llama.cpp's general.file_type, the torch dtype of the matrices). Norm gains and biases stay float32,
# as llama.cpp writes them for every file type ("except 1d tensors").
DTYPES = {"f32": ("ALL_F32", torch.float32), "f16": ("MOSTLY_F16", torch.float16),
          "bf16": ("MOSTLY_BF16", torch.bfloat16)}


def _import_gguf():
    try:
        import gguf
    except ImportError as error:
        raise ImportError("writing GGUF files needs the gguf package: pip install minillm[real] "
                          "(or pip install gguf)") from error
    return gguf


# ----------------------------------------------------------------------------------------------
# What the file can say. transformers' reader (modeling_gguf_pytorch_utils) reads, for llama, qwen2 and qwen3,
# the shape, rope.freq_base and context_length, and no rope.scaling.* key (it reads those for gpt-oss only);
# its head_dim is rope.dimension_count for llama, hidden/heads for qwen2 and Qwen3Config's default for qwen3.


def _check_expressible(model: Transformer, hf) -> None:
    """Raise, naming the setting, for what transformers' GGUF reader would read back as another model."""
    cfg, config = model.cfg, hf.config
    family, params = config.model_type, config.rope_parameters
    if model.position.rotary_dim != cfg.head_dim:  # HF's `proportional` RoPE: no rope type the reader sets
        raise ValueError(f"rope.rotary_dim={model.position.rotary_dim} < head_dim={cfg.head_dim} cannot go into a "
                         f"GGUF file that transformers reads back: its reader rotates whole heads")
    if params["rope_type"] != "default":  # static NTK is plain RoPE with another base: that one survives
        raise ValueError(f"rope_scaling.type={cfg.rope_scaling.name!r} cannot go into a GGUF file that transformers "
                         f"reads back: its GGUF reader ignores {family}.rope.scaling.* and would load "
                         f"plain RoPE (use format=hf, or a scaling of plain frequencies: none, ntk)")
    expected = cfg.d_model // cfg.n_heads if family == "qwen2" else \
        type(config)().head_dim if family == "qwen3" else cfg.head_dim
    if cfg.head_dim != expected:
        raise ValueError(f"model.head_size={cfg.head_dim} cannot go into a {family} GGUF file: transformers' reader "
                         f"takes the head size of {family} as {expected} (it reads no attention.key_length)")


def _pre_tokenizer_name(spec: dict | None) -> str:
    """llama.cpp's tokenizer.ggml.pre for a tokenizer.json pre_tokenizer: GPT-2's byte-level split ('gpt-2'),
    SmolLM's (digits one by one first: 'smollm'), or a regex split that transformers' reader knows by name."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    steps = (spec or {}).get("pretokenizers", [spec]) if (spec or {}).get("type") == "Sequence" else [spec]
    kinds = [step.get("type") if step else None for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        names = [name for name, split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == regex]
        if names:
            return names[0]
    raise ValueError(f"tokenizer.json: its pre-tokenizer ({' + '.join(map(str, kinds))}) has no GGUF name that "
                     f"transformers' GGUF reader rebuilds (byte-level GPT-2, SmolLM's digits, or a regex split it "
                     f"knows: {', '.join(sorted(GGUF_PRE_TOKENIZER_SPLITS))})")


def gguf_vocabulary(tokenizer: "tokenizers.Tokenizer", vocab_size: int, eos_token: str | None) -> dict:
    """The tokenizer as llama.cpp's gpt2 vocabulary: tokens by id (byte-level spellings, as tokenizer.json holds
    them), token types, merges, pre-tokenizer name and special ids; ids past the tokenizer up to the model's
    vocab_size are '[PAD<id>]', unused (llama.cpp's padding)."""
    spec = json.loads(tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer.json: a {model.get('type')} tokenizer cannot go into a GGUF file as "
                         f"transformers reads it back (GGUF's gpt2 vocabulary is a byte-level BPE)")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise ValueError(f"tokenizer.json: {size} tokens, more than the model's vocab_size={vocab_size}")
    by_id = {index: token for token, index in tokenizer.get_vocab(with_added_tokens=True).items()}
    added = {entry["id"]: entry["special"] for entry in spec.get("added_tokens", [])}
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        tokens.append(token if token is not None else f"[PAD{index}]")
        types.append(5 if token is None else 1 if index not in added else 3 if added[index] else 4)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    eos = tokenizer.token_to_id(eos_token) if eos_token is not None else None
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre, "eos": eos}


def _llama_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's layout of a llama q or k projection: within each head, HF's rotate_half pairs (j, j + d/2) become
    adjacent rows (2j, 2j+1), the pairs ggml's rotary rotates (convert_hf_to_gguf's permute; the reader undoes it)."""
    rows = weight.shape[0] // heads
    return weight.reshape(heads, 2, rows // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


@torch.no_grad()
def write_gguf(model: Transformer, tokenizer: "tokenizers.Tokenizer", path: Path, dtype: str = "f32",
               name: str = "minillm", eos_token: str | None = None) -> Path:
    """Write `model` and `tokenizer` to `path` as GGUF (dtype f32, f16 or bf16); every refusal comes before the
    first byte, and the file appears whole (written beside it, then renamed) or not at all."""
    gguf = _import_gguf()
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    hf = to_hf(model)
    _check_expressible(model, hf)
    config = hf.config
    family = config.model_type
    vocab = gguf_vocabulary(tokenizer, config.vocab_size, eos_token)
    file_type, matrix_dtype = DTYPES[dtype]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(partial, arch=family)
    try:
        writer.add_name(name)
        writer.add_file_type(gguf.LlamaFileType[file_type])
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
        writer.add_rope_dimension_count(model.position.rotary_dim)
        writer.add_key_length(model.cfg.head_dim)
        writer.add_value_length(model.cfg.head_dim)
        writer.add_vocab_size(config.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        writer.add_token_merges(vocab["merges"])
        if vocab["eos"] is not None:  # minillm's runs separate documents with it; padding reuses it (as SmolLM2)
            writer.add_eos_token_id(vocab["eos"])
            writer.add_pad_token_id(vocab["eos"])
        writer.add_add_bos_token(False)  # minillm never prepends one

        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.upper()], config.num_hidden_layers)
        for hf_name, tensor in hf.state_dict().items():
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # llama.cpp reads a file without output.weight as tied (and so does the reader)
            stem, suffix = hf_name.rsplit(".", 1)
            if family == "llama" and stem.endswith(("q_proj", "k_proj")):
                heads = config.num_attention_heads if stem.endswith("q_proj") else config.num_key_value_heads
                tensor = _llama_rows(tensor, heads)
            if tensor.dim() > 1 and matrix_dtype != torch.float32:
                tensor = tensor.to(matrix_dtype)
            array = tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
            raw = gguf.GGMLQuantizationType.BF16 if tensor.dtype == torch.bfloat16 else None
            writer.add_tensor(f"{names.get_name(stem)}.{suffix}", array.copy(), raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(partial, "rb+") as handle:  # on disk before the rename makes it the file
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return path
