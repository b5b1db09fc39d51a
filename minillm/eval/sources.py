"""What an evaluation measures: trained runs and imported models, with the text each reads."""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from minillm.data.synthetic import TaskConfig
from minillm.eval.config import EvalConfig
from minillm.eval.records import Setting
from minillm.model.transformer import Transformer

log = logging.getLogger("minillm")


@dataclass
class Subject:
    """One model to measure, who it is (its Setting before any evaluation setting: model, run, seed, training
    length, encoding, checkpoint, task), and what it reads: a trained run's validation documents, or an imported
    model's documents of `data` tokenized by its own tokenizer; or, for a run trained on a synthetic task, the task
    with the run's knobs."""

    model: Transformer
    setting: Setting
    tokenizer: object = None  # a tokenizers.Tokenizer (text)
    documents: list[np.ndarray] = field(default_factory=list)  # token ids of each document, longest first (text)
    task: Optional[TaskConfig] = None  # None: text
    stop_token: Optional[int] = None  # the token that ends a generated reply (EOS); None: generation runs its length
    chat_template: Optional["ChatTemplate"] = None  # an imported tokenizer's chat template; None: it has none


@dataclass(frozen=True)
class ChatTemplate:
    """A tokenizer's chat template (jinja) with the special tokens it may name, rendered as transformers'
    apply_chat_template renders it: a sandboxed environment with trim_blocks and lstrip_blocks, loop controls,
    raise_exception, strftime_now and a tojson that keeps non-ASCII text; the special tokens as variables."""

    template: str
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None

    @functools.cached_property
    def compiled(self):
        """The template compiled once (samples render it many times while their haystacks are fitted)."""
        import json
        from datetime import datetime

        from jinja2.exceptions import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        environment.filters["tojson"] = tojson
        environment.globals.update(raise_exception=raise_exception,
                                   strftime_now=lambda format: datetime.now().strftime(format))
        return environment.from_string(self.template)

    def render(self, user_text: str) -> str:
        """One user turn, then the assistant's header (add_generation_prompt=True): the text a reply continues."""
        specials = {name: value for name, value in (("bos_token", self.bos_token), ("eos_token", self.eos_token))
                    if value is not None}
        return self.compiled.render(messages=[{"role": "user", "content": user_text}], add_generation_prompt=True,
                                    **specials)


def _run_setting(run, model: Transformer, task: Optional[TaskConfig] = None) -> Setting:
    return Setting(model.cfg.label, run.name, run.seed, model.cfg.context_length, model.cfg.rope.variant,
                   str(run.checkpoint), task=task.name if task is not None else None)


def trained_subject(run, device: torch.device) -> Subject:
    """A training run (a minillm.runs.Run): its model, tokenizer and validation documents. What the run folder
    may say of them is minillm.runs.READ_FROM_RUN; its tokenizer must be the model's vocabulary."""
    from minillm.data.config import TokenizerConfig
    from minillm.data.text import TextTokens
    from minillm.data.tokens import read_tokenizer
    from minillm.runs import CheckpointError, RunFolder

    model = run.load_model().to(device)
    if not run.has_run_files():
        raise ValueError(f"ckpt: {run.folder} lacks config.yaml or tokenizer.json (not a training run folder)")
    tokenizer = read_tokenizer(run.tokenizer, "ckpt")
    vocab_size = tokenizer.get_vocab_size()
    # Another vocabulary reads as plausible, wrong perplexities. Fewer tokens than embedding rows is a padded table
    # (Qwen2: 151,936 rows for 151,665 tokens, kept by runs started from it) when the summary's data fingerprint
    # says the run trained with this very tokenizer.
    trained_with = RunFolder(run.folder).summary_values().get("data_fingerprint", {}).get("tokenizer", {})
    padded = vocab_size < model.cfg.vocab_size and \
        trained_with.get("sha256") == hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    if vocab_size != model.cfg.vocab_size and not padded:
        raise CheckpointError(f"ckpt: {run.tokenizer} has {vocab_size} tokens, the model of {run.checkpoint} "
                              f"{model.cfg.vocab_size}: the run folder's tokenizer is not the checkpoint's")
    data = TextTokens(run.data_config(), TokenizerConfig(path=str(run.tokenizer)),
                      seq_len=model.cfg.context_length, seed=run.seed)
    data.load()
    return Subject(model, _run_setting(run, model), data.tokenizer, data.long_documents(min_tokens=1),
                   stop_token=data.eos_id)


def run_task(run) -> Optional[TaskConfig]:
    """The synthetic task a training run learned (data.path=synthetic), with its knobs; None for a text run (or a
    folder without config.yaml, which trained_subject refuses)."""
    return run.task


def task_subject(run, task: TaskConfig, device: torch.device) -> Subject:
    """A run trained on `task`: its model, checked to cover the task's vocabulary."""
    model = run.load_model().to(device)
    if model.cfg.vocab_size < task.vocab_size:
        raise ValueError(f"ckpt: {run.checkpoint} has {model.cfg.vocab_size} tokens, the {task.name} task of its "
                         f"config.yaml {task.vocab_size}: the run folder's config is not the checkpoint's")
    return Subject(model, _run_setting(run, model, task), task=task)


def pretrained_subject(source, config: EvalConfig, device: torch.device) -> Subject:
    """An imported model (a minillm.pretrained.PretrainedSource) and the longest documents of config.data."""
    imported = source.load(config.trained_length)
    model = imported.model.to(device)
    setting = Setting(source.name, source.name, 0, model.cfg.context_length, model.cfg.rope.variant, source.location)
    subject = Subject(model, setting, imported.tokenizer, pretrained_documents(imported.tokenizer, config.data))
    if config.ruler:  # generation: where a reply ends, and the chat template its prompts may go through
        subject.chat_template, subject.stop_token = reply_format(source)
    return subject


def reply_format(source) -> tuple[Optional[ChatTemplate], Optional[int]]:
    """An imported model's chat template (None: its tokenizer has none) and its EOS token's id, which
    transformers' tokenizer keeps beside the tokenizer.json (the backend minillm encodes with has neither)."""
    import transformers

    where, kwargs = (str(source.path.parent), {"gguf_file": source.path.name}) if source.gguf else \
        (str(source.path) if source.local else source.location, {})
    tokenizer = transformers.AutoTokenizer.from_pretrained(where, **kwargs)
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one, as transformers picks
        template = template.get("default")
    chat = ChatTemplate(template, tokenizer.bos_token, tokenizer.eos_token) if template else None
    return chat, tokenizer.eos_token_id


def pretrained_documents(tokenizer, data) -> list[np.ndarray]:
    """The longest data.long_documents documents, longest first, tokenized without special tokens. All of
    data.split (and its validation split, if it has one) is read: nothing here was trained on it by us."""
    from minillm.data.corpus import document_texts, load_corpus

    corpus = load_corpus(data)
    texts = document_texts(corpus.train, data) + (document_texts(corpus.val, data) if corpus.val is not None else [])
    longest = sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i))[:4 * data.long_documents]
    encoded = [np.asarray(e.ids, dtype=np.int64)
               for e in tokenizer.encode_batch([texts[i] for i in longest], add_special_tokens=False)]
    encoded.sort(key=lambda ids: -len(ids))  # longest in characters is not always longest in tokens
    return [ids for ids in encoded if len(ids)][:data.long_documents]


def model_sources(config: EvalConfig) -> list:
    """What config.ckpt names: training runs (minillm.runs.Run) and models to import
    (minillm.pretrained.PretrainedSource), in order. In a list, a glob that matches nothing is skipped with a
    warning (a study's list names every encoding, and a partial sweep lacks some); when none matches, the first
    such glob is the error."""
    from minillm.interop.pretrained import PretrainedSource, is_pretrained
    from minillm.runs import CheckpointError, find_runs

    sources, unmatched = [], []
    for path in config.checkpoints:
        if is_pretrained(path):
            sources.append(PretrainedSource.parse(path))
            continue
        try:
            sources.extend(find_runs(path, config.data.cache_dir))  # the runs' documents cached where we say
        except CheckpointError as error:
            if not str(error).startswith("ckpt: nothing matches") or len(config.checkpoints) == 1:
                raise
            unmatched.append(error)
    if unmatched and not sources:
        raise unmatched[0]
    for error in unmatched:
        log.warning("%s: skipped", error)
    return sources


def source_config(source, config: EvalConfig):
    """The ModelConfig a source will be measured with, read without loading its weights."""
    from minillm.interop.pretrained import PretrainedSource

    if isinstance(source, PretrainedSource):
        return source.config(config.trained_length)
    if config.trained_length is not None:
        log.warning("trained_length=%d ignored for %s: a trained run's length is the one it was trained at",
                    config.trained_length, source.name)
    return source.model_config
