"""An lm-evaluation-harness model, "minillm": any checkpoint the evaluation reads, under any scaling and attention.

The harness's own command line finds only its built-in models (lm_eval 0.4 discovers no plugins), so the command
registers this one first and then hands over to it:

    python -m minillm.eval.harness --model minillm --model_args ckpt=<run folder, .ckpt, hf:<folder>, .gguf>,\\
        scaling=yarn,factor=4,attention=full --tasks <tasks> [every other lm_eval option]

In Python, `import minillm.eval.harness` registers it, and `lm_eval.simple_evaluate(model="minillm",
model_args={"ckpt": ...}, ...)` finds it. The model's settings are HarnessConfig's fields.

Tasks that load a tokenizer of their own with transformers' AutoTokenizer (lm-eval's RULER tasks size their
prompts with one) are given this model's: `tokenizer=<folder>` among the model_args writes it there as a
transformers tokenizer folder (PreTrainedTokenizerFast(tokenizer_object=...).save_pretrained), and lm_eval hands
the model_args to the tasks, whose `tokenizer` it is:

    python -m minillm.eval.harness --model minillm --model_args ckpt=<run>,tokenizer=hf_tokenizer \\
        --tasks niah_single_1,ruler_vt,ruler_cwe,ruler_fwe --metadata '{"max_seq_lengths": [4096]}'
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

MISSING = 'the lm-evaluation-harness adapter needs lm_eval: pip install -e ".[harness]"'
try:
    import lm_eval.models  # noqa: F401  (the harness's own models, registered lazily before ours)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as missing:
    if __name__ == "__main__":  # the command line: one line, not a traceback
        print(f"error: {MISSING}", file=sys.stderr)
        sys.exit(2)
    raise ImportError(MISSING) from missing

from minillm.eval.longrope_factors import searched_for
from minillm.eval.perplexity import scaling_for
from minillm.positions.methods import ATTENTION_METHODS, attention_method
from minillm.positions.scaling import SCALINGS
from minillm.precision import EVAL_PRECISIONS, eval_dtype
from minillm.registry import choice, positive, require

if TYPE_CHECKING:
    import tokenizers

    from minillm.eval.sources import ChatTemplate
    from minillm.model.transformer import Transformer

log = logging.getLogger("minillm")


@dataclass
class HarnessConfig:
    """The minillm model of lm-evaluation-harness (--model_args key=value,...)."""

    ckpt: str  # one model: a run folder, a .ckpt, hf:<folder or hub id>, or a .gguf file (as the evaluation's ckpt)
    # the frequency scaling a rotary model is read under (none, linear, ntk, dynamic_ntk, yarn, dynamic_yarn, llama3,
    # longrope)
    scaling: str = "none"
    # the scaling's factor; None: max_length / trained length (dynamic_ntk: 1; longrope: the one searched for)
    factor: Optional[float] = None
    # scaling=longrope: a result of scripts/longrope_search.py for this model; None: the run folder's longrope.json
    longrope_factors: Optional[str] = None
    # the attention method, with its default knobs: full, blockwise, sliding, self_extend, rerope, leaky_rerope,
    # lm_infinite, sinks (minillm.positions.methods)
    attention: str = "full"
    logn: bool = False  # scale queries by max(1, log_L(i + 1)) (Qwen's log-n)
    max_length: Optional[int] = None  # tokens a request is read with at most; None: trained length × factor
    trained_length: Optional[int] = None  # imported models' 1x; None: their config's context length
    device: str = "auto"  # lm_eval's --device: auto (cuda where there is one), cpu, cuda, cuda:<n>, mps
    # auto: bf16 matmuls where the processor multiplies bf16 natively (minillm.precision), float32 elsewhere
    precision: str = "auto"
    batch_size: int = 1  # lm_eval's --batch_size: requests per forward pass
    max_gen_toks: int = 256  # tokens generate_until produces at most where the task sets no limit
    # a folder to write the model's tokenizer to as a transformers tokenizer, for tasks that load one (RULER)
    tokenizer: Optional[str] = None

    def __post_init__(self) -> None:
        require(isinstance(self.ckpt, str) and self.ckpt != "", "ckpt", "name one checkpoint, run folder, hf:<folder> "
                                                                        "or .gguf file")
        self.scaling = "none" if self.scaling is None else str(self.scaling)  # lm_eval reads scaling=none as None
        choice(self.scaling, "scaling", SCALINGS)
        require(self.longrope_factors is None or self.scaling == "longrope", "longrope_factors",
                f"factors for scaling=longrope, not {self.scaling}")
        if self.factor is not None:
            self.factor = float(self.factor)
            positive(self.factor, "factor")
        choice(self.attention, "attention", ATTENTION_METHODS)
        require(isinstance(self.logn, bool), "logn", f"must be true or false, got {self.logn!r}")
        if isinstance(self.batch_size, str) and self.batch_size.isdigit():  # lm_eval's --batch_size is text
            self.batch_size = int(self.batch_size)
        for name in ("max_length", "trained_length", "batch_size", "max_gen_toks"):
            value = getattr(self, name)
            require(value is None or (isinstance(value, int) and value >= 1), name,
                    f"must be a positive whole number, got {value!r}")
        choice(self.precision, "precision", EVAL_PRECISIONS)
        require(self.device in ("auto", "cpu", "mps") or self.device.split(":")[0] == "cuda", "device",
                f"expected auto, cpu, cuda, cuda:<n> or mps, got {self.device!r}")


def harness_config(arguments: dict) -> HarnessConfig:
    """HarnessConfig from the model_args lm_eval passes; an unknown key is named with the known ones."""
    known = [f.name for f in fields(HarnessConfig)]
    for key in arguments:
        choice(key, "model_args", known)
    require("ckpt" in arguments, "ckpt", "name the model: --model_args ckpt=<run folder, .ckpt, hf:<folder>, .gguf>")
    return HarnessConfig(**arguments)


def torch_device(requested: str) -> torch.device:
    """The device `requested` names; one this torch cannot see is refused, naming the setting."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = requested.split(":")[0]
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}.get(kind, True)
    require(available, "device", f"torch {torch.__version__} sees no {kind} device here; use device=cpu or auto")
    return torch.device(requested)


class Loaded(NamedTuple):
    """A model to read and how its text is written."""

    model: "Transformer"
    tokenizer: "tokenizers.Tokenizer"  # the model's own (what it was trained or imported with)
    prefix_id: int  # the token a text's first token is predicted after: BOS, else EOS (as lm_eval's HF model)
    end_id: int  # end of text: where a generation stops
    chat: Optional["ChatTemplate"] = None  # an imported tokenizer's chat template; None: it has none


def load(config: HarnessConfig) -> Loaded:
    """config.ckpt read as the evaluation reads it (minillm.eval.sources): the same refusals, in the same words."""
    from minillm.data.tokens import EOS_TOKEN, read_tokenizer
    from minillm.eval.config import EvalConfig
    from minillm.eval.sources import model_sources, reply_format
    from minillm.interop.pretrained import PretrainedSource
    from minillm.runs import CheckpointError

    sources = model_sources(EvalConfig(ckpt=config.ckpt))
    named = ", ".join(source.name for source in sources[:3]) + (", ..." if len(sources) > 3 else "")
    require(len(sources) == 1, "ckpt", f"names {len(sources)} models ({named}); the harness reads one")
    source = sources[0]
    if isinstance(source, PretrainedSource):
        imported = source.load(config.trained_length)
        chat, end = reply_format(source)  # the EOS and template transformers' tokenizer keeps beside tokenizer.json
        end = end if end is not None else imported.tokenizer.token_to_id(EOS_TOKEN)
        require(end is not None, "ckpt", f"{source.describe()} names no end-of-text token (eos_token)")
        bos = source.hf_config().bos_token_id
        return Loaded(imported.model, imported.tokenizer, bos if isinstance(bos, int) else end, end, chat)
    if config.trained_length is not None:
        log.warning("trained_length=%d ignored for %s: a trained run's length is the one it was trained at",
                    config.trained_length, source.name)
    if source.task is not None:
        raise ValueError(f"ckpt: {source.name} was trained on the synthetic task {source.task.name}; the harness "
                         f"reads text")
    model = source.load_model()
    if not source.has_run_files():
        raise ValueError(f"ckpt: {source.folder} lacks config.yaml or tokenizer.json (not a training run folder)")
    tokenizer = read_tokenizer(source.tokenizer, "ckpt")
    if tokenizer.get_vocab_size() != model.cfg.vocab_size:  # another vocabulary reads as plausible, wrong scores
        raise CheckpointError(f"ckpt: {source.tokenizer} has {tokenizer.get_vocab_size()} tokens, the model of "
                              f"{source.checkpoint} {model.cfg.vocab_size}: the run folder's tokenizer is not the "
                              f"checkpoint's")
    end = tokenizer.token_to_id(EOS_TOKEN)  # what training put between documents: the context of a first token
    return Loaded(model, tokenizer, end, end)


def write_tokenizer_folder(tokenizer, folder: str, eos_id: int, bos_id: int) -> None:
    """`tokenizer` as a transformers tokenizer folder (what AutoTokenizer.from_pretrained(folder) reads), adding no
    special tokens when it encodes. A folder that holds another tokenizer, or files that are no tokenizer's, is
    refused: a task would size its prompts with the wrong one."""
    from pathlib import Path

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path = Path(folder).expanduser()
    if (path / "tokenizer.json").is_file():
        require(_encoding(Tokenizer.from_file(str(path / "tokenizer.json"))) == _encoding(tokenizer), "tokenizer",
                f"{path} holds another tokenizer than this model's; name a new folder")
        return
    require(not path.exists() or (path.is_dir() and not any(path.iterdir())), "tokenizer",
            f"{path} exists and holds no tokenizer.json; name a new or empty folder")
    copy = Tokenizer.from_str(tokenizer.to_str())  # transformers sets its own post-processor on the object it wraps
    PreTrainedTokenizerFast(tokenizer_object=copy, eos_token=tokenizer.id_to_token(eos_id),
                            bos_token=tokenizer.id_to_token(bos_id)).save_pretrained(str(path))


def _encoding(tokenizer) -> dict:
    """What decides a tokenizer's ids for a text: all of tokenizer.json but the special tokens added around it
    (transformers writes a post-processor of its own) and padding and truncation, which encode() does not apply."""
    settings = json.loads(tokenizer.to_str())
    return {key: value for key, value in settings.items() if key not in ("post_processor", "padding", "truncation")}


@register_model("minillm")
class MiniLLM(TemplateLM):
    """A minillm Transformer in lm-evaluation-harness: loglikelihood (sum of the targets' log-probabilities and
    whether greedy decoding yields them), loglikelihood_rolling (lm_eval's disjoint windows of max_length) and
    generate_until (greedy, with the KV cache), every forward under the configured scaling, attention and log-n."""

    def __init__(self, **model_args) -> None:
        super().__init__()
        config = self.config = harness_config(model_args)
        self._device = torch_device(config.device)
        model, self.tokenizer, self.prefix_id, self.end_id, self.chat = load(config)
        self.model = model.to(self._device).eval()
        trained = model.cfg.context_length
        searched = searched_for(config.ckpt, trained, config.longrope_factors) if config.scaling == "longrope" else None
        factor = searched.factor if searched is not None and config.factor is None else config.factor  # its target's
        if config.max_length is None:
            self.max_length = round(trained * factor) if factor is not None else trained
        else:
            self.max_length = config.max_length
        self.scaling = scaling_for(config.scaling, self.max_length, trained, config.factor, searched)
        limit = model.cfg.rope.max_position(trained)
        require(limit is None or self.max_length <= limit, "max_length",
                f"{self.max_length} is past {model.cfg.rope.variant} positions, which stop at {limit}")
        self.reading = {"scaling": self.scaling, "attention": attention_method(config.attention), "logn": config.logn}
        self.dtype, self.precision_reason = eval_dtype(config.precision, self._device)
        # A two-token forward now: whatever the model refuses (a scaling on a non-rotary model, an attention method
        # its encoding cannot serve, log-n on a model with its own query temperature) is said before any task runs.
        self.model.hidden_states(torch.zeros(1, 2, dtype=torch.long, device=self._device), **self.reading)
        if config.tokenizer is not None:
            write_tokenizer_folder(self.tokenizer, config.tokenizer, self.end_id, self.prefix_id)
        log.info("minillm: %s, max_length %d, scaling %s×%g, attention %s%s, %s (%s)", config.ckpt, self.max_length,
                 self.scaling.name, self.scaling.factor, config.attention, " +logn" if config.logn else "",
                 str(self.dtype).removeprefix("torch."), self.precision_reason)

    # ------------------------------------------------------------------------------------------
    # Tokens

    @property
    def eot_token_id(self) -> int:
        return self.end_id

    @property
    def prefix_token_id(self) -> int:
        return self.prefix_id

    @property
    def tokenizer_name(self) -> str:
        """What lm_eval keys its cache of chat-templated requests by."""
        return self.config.ckpt

    def chat_template(self, chat_template: "bool | str" = False) -> Optional[str]:
        """The imported tokenizer's template (lm_eval records it with the results); None where there is none."""
        return self.chat.template if self.chat is not None else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The turns (--apply_chat_template, few-shot ones too) rendered by the tokenizer's chat template, as
        transformers renders it (minillm.eval.sources.ChatTemplate)."""
        require(self.chat is not None, "apply_chat_template", f"the tokenizer of {self.config.ckpt} has no chat "
                                                              f"template")
        specials = {name: value for name, value in (("bos_token", self.chat.bos_token),
                                                    ("eos_token", self.chat.eos_token)) if value is not None}
        return self.chat.compiled.render(messages=chat_history, add_generation_prompt=add_generation_prompt,
                                         **specials)

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """The model's own tokenizer, no special tokens added (as our training and the evaluation encode)."""
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------------------------------
    # Scoring

    def _autocast(self):
        return torch.autocast(self._device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    @torch.inference_mode()
    def _score(self, windows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """For each (tokens, n): the summed log-probability of the last n tokens given those before them, and
        whether each is the argmax. Windows are batched longest first, padded on the right (causal attention: the
        padding is never seen); a dynamic scaling, whose frequencies follow the length, batches equal lengths only."""
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(windows)
        batch: list[int] = []
        for position, index in enumerate(order):
            batch.append(index)
            following = order[position + 1] if position + 1 < len(order) else None
            same_length = following is not None and len(windows[following][0]) == len(windows[index][0])
            if following is None or len(batch) == self.config.batch_size or (
                    self.scaling.dynamic and not same_length):
                for i, result in zip(batch, self._score_batch([windows[i] for i in batch])):
                    results[i] = result
                batch = []
        return results

    def _score_batch(self, windows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        longest = max(len(tokens) for tokens, _ in windows) - 1
        inputs = torch.zeros(len(windows), longest, dtype=torch.long)
        for row, (tokens, _) in enumerate(windows):
            inputs[row, :len(tokens) - 1] = torch.tensor(tokens[:-1])
        scored = []
        with self._autocast():
            hidden = self.model.hidden_states(inputs.to(self._device), **self.reading)
            for row, (tokens, n) in enumerate(windows):
                if n == 0:  # an empty continuation: certain, and what greedy decoding yields
                    scored.append((0.0, True))
                    continue
                end = len(tokens) - 1  # the row's last input: it predicts the last token
                logits = self.model.head(hidden[row, end - n:end]).float()  # the LM head on scored positions only
                targets = torch.tensor(tokens[-n:], device=logits.device)
                logprob = logits.log_softmax(-1).gather(-1, targets[:, None]).sum()
                scored.append((float(logprob), bool((logits.argmax(-1) == targets).all())))
        return scored

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(context, continuation) token lists -> (log-probability of the continuation, is greedy). A context longer
        than max_length leaves is cut from the left (as lm_eval's HF model does), said in a warning."""
        windows, cut = [], 0
        for (strings, context, continuation) in requests:
            require(len(continuation) <= self.max_length, "max_length", f"a continuation of {len(continuation)} "
                    f"tokens cannot be scored within max_length={self.max_length}")
            tokens = (context + continuation)[-(self.max_length + 1):]
            cut += len(tokens) < len(context) + len(continuation)
            windows.append((tokens, len(continuation)))
        if cut:
            log.warning("minillm: %d of %d requests cut from the left to max_length=%d tokens", cut, len(requests),
                        self.max_length)
        results = self._score(windows)
        for (strings, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's summed log-probability over lm_eval's rolling windows (get_rolling_token_windows, made
        disjoint): windows of max_length tokens, each token predicted once, the first after the prefix token."""
        windows, owner = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((context + continuation, len(continuation)))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._score(windows)):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------------------------------
    # Generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations (Transformer.generate with the KV cache), cut before the first `until` string or
        the end-of-text token, at most max_gen_toks tokens. Requests whose prompts have the same length and
        limits share a batch; a prompt longer than max_length leaves room for is cut from the left (a warning)."""
        prepared, cut = [], 0
        for request in requests:
            context, gen_kwargs = request.args
            settings = normalize_gen_kwargs(gen_kwargs, self.config.max_gen_toks)
            require(not settings["do_sample"], "generate_until", "the task asks for sampling (do_sample=true); the "
                                                                 "minillm model decodes greedily")
            new_tokens = settings["max_gen_toks"]
            room = self.max_length - new_tokens
            require(room >= 1, "max_length", f"{self.max_length} leaves no room for a prompt before "
                                             f"max_gen_toks={new_tokens} tokens")
            prompt = self.tok_encode(context)
            cut += len(prompt) > room
            until = handle_stop_sequences(settings["until"], eos=self.tok_decode([self.end_id]))
            prepared.append((prompt[-room:], new_tokens, until))
        if cut:
            log.warning("minillm: %d of %d prompts cut from the left to leave max_gen_toks within max_length=%d",
                        cut, len(requests), self.max_length)
        outputs: list[str] = [""] * len(requests)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (prompt, new_tokens, _) in enumerate(prepared):
            groups.setdefault((len(prompt), new_tokens), []).append(index)
        for (_, new_tokens), members in groups.items():
            for start in range(0, len(members), self.config.batch_size):
                batch = members[start:start + self.config.batch_size]
                for index, tokens in zip(batch, self._generate([prepared[i][0] for i in batch], new_tokens)):
                    text = self.tok_decode(tokens)
                    for stop in prepared[index][2]:
                        text = text.split(stop)[0] if stop else text
                    outputs[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
        return outputs

    def _generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy tokens after each prompt (equal lengths), up to the end-of-text token (not included)."""
        with self._autocast():
            out = self.model.generate(torch.tensor(prompts, device=self._device), new_tokens, temperature=0,
                                      stop_token=self.end_id, **self.reading)
        return [row[:row.index(self.end_id)] if self.end_id in row else row
                for row in out[:, len(prompts[0]):].tolist()]


def main(argv: Optional[list[str]] = None) -> None:
    """lm_eval's own command line with "minillm" registered; --device defaults to auto here (lm_eval's: cuda:0).
    A refused setting, checkpoint or file ends in one `error:` line, exit 2."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model" in argv and not any(arg == "--device" or arg.startswith("--device=") for arg in argv):
        argv += ["--device", "auto"]
    sys.argv = ["lm_eval", *argv]
    try:
        for flag in ("device", "batch_size"):  # lm_eval passes its own --device and --batch_size beside model_args
            require(not any(arg.startswith(f"{flag}=") or f",{flag}=" in arg for arg in argv), "model_args",
                    f"{flag} is lm_eval's --{flag}: give it as --{flag} <value>")
        cli_evaluate()
    except (ValueError, OSError) as error:
        print(f"error: {str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        sys.exit(2)

if __name__ == "__main__":
    main()
