"""The evaluation loop: every (model × scaling × attention × length) measurement."""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from minillm.data.answers import validation_set
from minillm.eval.config import EvalConfig
from minillm.eval.passkey import measure_passkey
from minillm.eval.perplexity import (
    evaluation_tokens,
    perplexity_at_length,
    rotary_key,
    scaling_for,
    tail_loss,
)
from minillm.eval.records import (
    AccuracyRecord,
    ModelInfo,
    Perplexity,
    PerplexityRecord,
    Results,
    TailLossRecord,
    TheoryRecord,
)
from minillm.eval.sources import (
    Subject,
    TaskSubject,
    model_sources,
    pretrained_subject,
    run_task,
    source_config,
    task_subject,
    trained_subject,
)
from minillm.eval.tasks import TaskScore, effective_lengths, task_accuracy
from minillm.eval.theory import critical_dimension, minimum_base, supported_length
from minillm.model.transformer import Transformer
from minillm.positions.methods import AttentionMethod, check_encoding
from minillm.precision import eval_dtype

log = logging.getLogger("minillm")


def _theory(model: Transformer, info: ModelInfo, lengths: list[int]) -> list[TheoryRecord]:
    rope, trained = model.cfg.rope, model.cfg.context_length
    rotary_dim = rope.rotary_dim or model.cfg.head_dim
    critical, bound = critical_dimension(rotary_dim, rope.theta, trained)
    return [TheoryRecord(info.model, info.run, rotary_dim, rope.theta, trained, critical, bound, length,
                         minimum_base(rotary_dim, length), supported_length(rotary_dim, rope.theta, length))
            for length in lengths]


def evaluate_run(run, config: EvalConfig, device: torch.device) -> Results:
    """Every (scaling × attention × length) measurement of one trained run or imported model: task accuracy for
    a run trained on a synthetic task, perplexity and the rest otherwise."""
    from minillm.interop.pretrained import PretrainedSource

    if isinstance(run, PretrainedSource):
        return measure(pretrained_subject(run, config, device), config)
    task = run_task(run)
    if task is not None:
        return measure_accuracy(task_subject(run, task, device), config)
    return measure(trained_subject(run, device), config)


def _lengths(config: EvalConfig, trained: int) -> list[int]:
    return sorted(config.lengths or [trained * m for m in (1, 2, 4, 8, 16)])


def _scalings(config: EvalConfig, model: Transformer, info: ModelInfo) -> list[str]:
    """The scalings to evaluate: config.scalings for a rotary model, "none" for any other."""
    methods = config.scalings if model.cfg.rope.is_rotary else ["none"]
    ignored = sorted(set(config.scalings) - set(methods))
    if ignored:
        log.warning("scalings %s skipped for %s: %s is not rotary", ignored, info.run, model.cfg.rope.variant)
    return methods


def measure(subject: Subject, config: EvalConfig) -> Results:
    """Every (scaling × attention × length) measurement of one model on its documents."""
    from tqdm.auto import tqdm

    model, info = subject.model, subject.info
    trained = model.cfg.context_length
    lengths = _lengths(config, trained)
    longest_documents = subject.documents  # longest first
    longest = len(longest_documents[0]) - 1 if longest_documents else 0  # targets in the longest document
    documents = [d for d in longest_documents if len(d) >= min(lengths) + 1]
    usable = [n for n in lengths if n <= longest]
    for n in sorted(set(lengths) - set(usable)):
        log.warning("length %d skipped for %s: the longest document has %d tokens", n, info.run, longest + 1)
    if not usable:
        raise ValueError(f"lengths: none of {lengths} fits the documents of {info.run} "
                         f"(longest: {longest + 1} tokens)")
    tokens = evaluation_tokens(documents, max(usable), config.max_documents)
    methods = _scalings(config, model, info)
    limit = model.position.max_length  # the encoding's own limit (learned positions: the training length)
    served, refused = served_methods(config, model.cfg)
    for name, reason in refused.items():
        log.warning("attention %s skipped for %s: %s", name, info.run, reason)
    suffix = "+logn" if config.logn else ""
    results = Results()
    plan = [(m, a, n) for m in methods for a in config.attention for n in usable]
    done: dict[tuple, tuple[Perplexity, Optional[tuple[float, int]]]] = {}
    for method, attention, length in tqdm(plan, desc=f"perplexity {info.run}", unit="length"):
        setting = dict(vars(info), method=method, attention=attention + suffix, stride=config.stride)
        if attention in refused or (limit is not None and length > limit):
            note = refused.get(attention) or f"{info.variant} positions stop at {limit}"
            results.perplexity.append(PerplexityRecord(length=length, loss=None, ppl=None, applicable=False,
                                                       note=note, **setting))
            continue
        scaling = scaling_for(method, length, trained, config.scaling_factor)
        reading = dict(attention=served[attention], scaling=scaling, logn=config.logn)
        # A scaling that leaves this length's frequencies as another left them (every static one at factor 1,
        # i.e. up to the training length) computes the same numbers: reuse them.
        key = (attention, length, rotary_key(model, scaling, length))
        if key not in done:
            measured = perplexity_at_length(model, tokens, length, **reading, stride=config.stride,
                                            batch_size=config.batch_size, buckets=config.buckets)
            tail = None
            if config.tail_loss and length >= trained:  # the same last `trained` targets at every length
                tail = tail_loss(model, tokens, length, trained, **reading, batch_size=config.batch_size)
            done[key] = measured, tail
        measured, tail = done[key]
        if tail is not None:
            results.tail.append(TailLossRecord(info.model, info.run, info.seed, trained, method,
                                               attention + suffix, length, trained, *tail))
        results.perplexity.append(PerplexityRecord(**vars(measured), factor=scaling.factor, **setting))
    if config.passkey_trials:
        passkey_lengths = [n for n in usable if limit is None or n <= limit]
        total = len(methods) * len(served) * len(passkey_lengths) * len(config.passkey_depths) * config.passkey_trials
        with tqdm(total=total, desc=f"passkey {info.run}", unit="trial") as progress:
            results.passkey = measure_passkey(model, subject.tokenizer, np.concatenate(documents), passkey_lengths, methods,
                                       served, config, info, progress)
    if model.cfg.rope.is_rotary:
        results.theory = _theory(model, info, usable)
    return results


def measure_accuracy(subject: TaskSubject, config: EvalConfig) -> Results:
    """Every (scaling × attention × length) accuracy of one task-trained model on config.task_examples examples of
    the task's test stream (never seen in training or validation), and its effective lengths. A length the task
    refuses, or the encoding cannot reach, gives a record that does not apply, with the reason as its note."""
    from tqdm.auto import tqdm

    model, task, info = subject.model, subject.task, subject.info
    trained = model.cfg.context_length
    lengths = _lengths(config, trained)
    methods = _scalings(config, model, info)
    limit = model.position.max_length  # the encoding's own limit (learned positions: the training length)
    served, refused = served_methods(config, model.cfg)
    for name, reason in refused.items():
        log.warning("attention %s skipped for %s: %s", name, info.run, reason)
    unreachable = {}  # length -> why it cannot be measured
    for length in lengths:
        try:
            task.check_length(length)
        except ValueError as error:  # names the knob that bounds it
            unreachable[length] = str(error)
        if limit is not None and length > limit:
            unreachable[length] = f"{info.variant} positions stop at {limit}"
    suffix = "+logn" if config.logn else ""
    results = Results()
    examples: dict[int, tuple[Tensor, ...]] = {}  # length -> the test examples, drawn once for every setting
    done: dict[tuple, TaskScore] = {}
    plan = [(m, a, n) for m in methods for a in config.attention for n in lengths]
    for method, attention, length in tqdm(plan, desc=f"accuracy {info.run}", unit="length"):
        setting = dict(model=info.model, run=info.run, seed=info.seed, trained_length=trained,
                       variant=info.variant, task=task.name, method=method, attention=attention + suffix,
                       length=length)
        note = refused.get(attention) or unreachable.get(length)
        if note is not None:
            results.accuracy.append(AccuracyRecord(applicable=False, note=note, **setting))
            continue
        scaling = scaling_for(method, length, trained, config.scaling_factor)
        key = (attention, length, rotary_key(model, scaling, length))  # the same frequencies: the same numbers
        if key not in done:
            if length not in examples:
                examples[length] = validation_set(task, length, config.task_examples, config.seed,
                                                  split="test").tensors
            done[key] = task_accuracy(model, *examples[length], attention=served[attention], scaling=scaling,
                                      logn=config.logn, batch_size=config.batch_size)
        results.accuracy.append(done[key].record(**setting))
    results.effective_length = effective_lengths(results.accuracy, config.effective_threshold,
                                                 config.effective_min_exact_match)
    if model.cfg.rope.is_rotary:
        results.theory = _theory(model, info, [n for n in lengths if n not in unreachable])
    return results


def served_methods(config: EvalConfig, model_cfg) -> tuple[dict[str, AttentionMethod], dict[str, str]]:
    """The requested attention methods this model can serve (name -> method), and why the others cannot."""
    served, refused = {}, {}
    for name in config.attention:
        method = config.method(name)
        try:
            check_encoding(method, model_cfg.rope, model_cfg.context_length)
            served[name] = method
        except ValueError as error:
            refused[name] = str(error)
    return served, refused


def evaluate(config: EvalConfig, device: torch.device) -> Results:
    """Every (checkpoint × scaling × attention × length) measurement of the checkpoints config names: each run
    its own kind (task accuracy for runs trained on a synthetic task, perplexity and the rest otherwise).

    Before measuring anything: an attention method that none of the runs can serve (or whose knobs fit none of
    their training lengths) is an error naming it; one that some runs cannot serve is skipped for those."""
    sources = [(run, source_config(run, config)) for run in model_sources(config)]
    if config.logn:  # a model trained with its own query temperature is skipped; with every one so, refused
        scaled = [(run, cfg) for run, cfg in sources if cfg.attn_temperature != "none"]
        if sources and len(scaled) == len(sources):
            raise ValueError(f"logn: every run already scales its queries (model.attn_temperature="
                             f"{scaled[0][1].attn_temperature!r} in {scaled[0][0].name})")
        for run, cfg in scaled:
            log.warning("logn: %s skipped: it already scales its queries (model.attn_temperature=%r)",
                        run.name, cfg.attn_temperature)
        sources = [(run, cfg) for run, cfg in sources if cfg.attn_temperature == "none"]
    runs, configs = [run for run, _ in sources], [cfg for _, cfg in sources]
    refusals = [served_methods(config, cfg)[1] for cfg in configs]
    for name in config.attention:
        if runs and all(name in refused for refused in refusals):
            raise ValueError(refusals[0][name])
    dtype, reason = eval_dtype(config.precision, device)
    results = Results(precision=str(dtype).removeprefix("torch."), precision_reason=reason)
    # bf16: the matmuls under autocast; losses, norms, softmax statistics and rotary angles stay float32.
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for run in runs:
            results.extend(evaluate_run(run, config, device))
    return results
