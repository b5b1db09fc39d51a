"""Hand a model back: python scripts/export.py ckpt=<run folder, .ckpt, hf:<folder> or .gguf> format=hf|gguf out=<path>

    ckpt=     a run folder or checkpoint (its tokenizer.json goes with it), or an imported model (hf:<folder or
              hub id>, <file>.gguf) with its own tokenizer
    format=   hf: a transformers folder (save_pretrained: config.json with the rope parameters of the run's
              scaling, safetensors, the tokenizer); gguf: one unquantized GGUF file (llama.cpp's conventions)
    out=      the folder (hf) or the .gguf file to write; an existing one is replaced whole, or left as it was
    dtype=    f32 (default), f16 or bf16: the matrices' type (GGUF keeps norm gains and biases in f32)

Llama-shaped models go out as Llama, with q/k/v biases as Qwen2, with QK-norm as Qwen3. What the target cannot
express (another norm or encoding, a scaling transformers' GGUF reader drops, ...) is refused in one line naming it.
"""

import sys

SETTINGS = ("ckpt", "format", "out", "dtype")


def parse(argv: list[str]) -> dict:
    """key=value arguments -> settings; ValueError naming the first one that is not."""
    settings = {"dtype": "f32"}
    for arg in argv:
        key, equals, value = arg.partition("=")
        if not equals or key not in SETTINGS:
            raise ValueError(f"{arg!r}: expected one of {', '.join(s + '=' for s in SETTINGS)} (see --help)")
        settings[key] = value
    missing = [key for key in ("ckpt", "format", "out") if not settings.get(key)]
    if missing:
        raise ValueError(f"{missing[0]}: missing (python scripts/export.py ckpt=<run> format=hf|gguf out=<path>)")
    return settings


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        return
    try:
        settings = parse(argv)
        from minillm.console import quiet_libraries
        from minillm.data.tokens import EOS_TOKEN
        from minillm.interop.handback import export

        quiet_libraries()
        out = export(settings["ckpt"], settings["format"], settings["out"], settings["dtype"], eos_token=EOS_TOKEN)
    except (ValueError, OSError, ImportError) as error:
        print(f"error: {str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        sys.exit(2)
    print(f"{settings['format']} export of {settings['ckpt']} in {out}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
