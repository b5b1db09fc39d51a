"""The evaluation loop: every (model × scaling × attention × length) setting, handed to every measurement that
applies (minillm.eval.measurement.MEASUREMENTS)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch

from minillm.eval.config import ALL_SCALINGS, EvalConfig
from minillm.eval.longrope_factors import subject_longrope
from minillm.eval.measurement import MEASUREMENTS, Measurement, Plan, Reading
from minillm.eval.perplexity import rotary_key, scaling_for
from minillm.eval.records import Record, Results
from minillm.eval.sources import (
    Subject,
    model_sources,
    pretrained_subject,
    run_task,
    source_config,
    task_subject,
    trained_subject,
)
from minillm.positions.methods import AttentionMethod, check_encoding
from minillm.precision import eval_dtype

log = logging.getLogger("minillm")


def evaluate_run(run, config: EvalConfig, device: torch.device) -> Results:
    """Every (scaling × attention × length) measurement of one trained run or imported model: task accuracy for
    a run trained on a synthetic task, perplexity and the rest otherwise."""
    from minillm.interop.pretrained import PretrainedSource

    if isinstance(run, PretrainedSource):
        return measure(pretrained_subject(run, config, device), config)
    task = run_task(run)
    if task is not None:
        return measure(task_subject(run, task, device), config)
    return measure(trained_subject(run, device), config)


def outline(model_cfg, config: EvalConfig) -> Plan:
    """The settings a model of `model_cfg` is read at, known before its weights are loaded: config.lengths (1, 2, 4,
    8, 16 × the training length by default), config.scalings (rotary models; "none" for any other), the attention
    methods it can serve, and the lengths past the encoding's own limit (learned positions: the training length)."""
    trained = model_cfg.context_length
    lengths = sorted(config.lengths or [trained * m for m in (1, 2, 4, 8, 16)])
    scalings = config.scalings if model_cfg.rope.is_rotary else ["none"]
    served, refused = served_methods(config, model_cfg)
    limit = model_cfg.rope.max_position(trained)
    unreachable = {n: f"{model_cfg.rope.variant} positions stop at {limit}" for n in lengths
                   if limit is not None and n > limit}
    return Plan(lengths, scalings, served, refused, unreachable)


def forecast(sources: list, config: EvalConfig) -> str:
    """One line, said before anything is measured: the models, their settings (scalings × attention methods ×
    lengths) and the cells each measurement will fill, so that a long evaluation is known to be long up front."""
    from minillm.interop.pretrained import PretrainedSource

    shapes, cells = [], {}
    for run, model_cfg in sources:
        kind = "text" if isinstance(run, PretrainedSource) or run_task(run) is None else "task"
        settings = outline(model_cfg, config)
        shapes.append((len(settings.scalings), len(settings.served), len(settings.lengths)))
        for cls in (cls for cls in MEASUREMENTS.values() if kind in cls.kinds):
            cells[cls.name] = cells.get(cls.name, 0) + cls.cells(settings, model_cfg.context_length, config)
    total = sum(s * a * n for s, a, n in shapes)
    if len(set(shapes)) == 1:
        s, a, n = shapes[0]
        head = " × ".join([counted(len(shapes), "model"), counted(s, "scaling"), counted(a, "attention method"),
                           counted(n, "length")])
    else:
        each = " + ".join(f"{s}×{a}×{n}" for s, a, n in shapes)
        head = f"{len(shapes)} models ({each} scalings × attention × lengths)"
    measured = ", ".join(f"{n} {name}" for name, n in cells.items() if n)
    more = "" if set(config.scalings) >= set(ALL_SCALINGS) else "; scalings=all measures every scaling"
    return f"measuring {head} = {counted(total, 'setting')}; cells: {measured}{more}"


def counted(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


def plan(subject: Subject, config: EvalConfig) -> Plan:
    """The settings `subject` is read at (its outline), for text those lengths its longest document reaches, and
    why some lengths cannot be measured (the task refuses them, the encoding stops short)."""
    model, run = subject.model, subject.setting.run
    settings = outline(model.cfg, config)
    lengths, unreachable = settings.lengths, dict(settings.unreachable)
    if subject.task is None:
        longest = len(subject.documents[0]) - 1 if subject.documents else 0  # targets in the longest document
        for n in [n for n in lengths if n > longest]:
            log.warning("length %d skipped for %s: the longest document has %d tokens", n, run, longest + 1)
        if all(n > longest for n in lengths):
            raise ValueError(f"lengths: none of {lengths} fits the documents of {run} (longest: {longest + 1} tokens)")
        lengths = [n for n in lengths if n <= longest]
    else:
        for length in lengths:
            try:
                subject.task.check_length(length)
            except ValueError as error:  # names the knob that bounds it
                unreachable[length] = str(error)
    ignored = sorted(set(config.scalings) - set(settings.scalings))
    if ignored:
        log.warning("scalings %s skipped for %s: %s is not rotary", ignored, run, model.cfg.rope.variant)
    for name, reason in settings.refused.items():
        log.warning("attention %s skipped for %s: %s", name, run, reason)
    return dataclasses.replace(settings, lengths=lengths, unreachable=unreachable)


def measure(subject: Subject, config: EvalConfig) -> Results:
    """Every measurement that applies to `subject` at every setting of its plan: where a setting cannot be measured
    (the model cannot serve the attention method, the length is unreachable) each measurement says so in its own
    records (or leaves it out); settings whose rotary frequencies are equal are measured once. Then the records
    derived from the others (effective length) or from the model alone (RoPE theory)."""
    from tqdm.auto import tqdm

    model, trained = subject.model, subject.model.cfg.context_length
    settings = plan(subject, config)
    # LongRoPE's factors, searched for this model (scripts/longrope_search.py), read once for every length
    searched = subject_longrope(subject, config.longrope_factors) if "longrope" in settings.scalings else None
    measurements: list[Measurement] = [cls(subject, settings, config) for cls in MEASUREMENTS.values()
                                       if cls.applies(subject, config)]
    base = dataclasses.replace(subject.setting, logn=config.logn,
                               stride=config.stride if subject.task is None else None)
    results = Results()
    done: dict[tuple, list[Record]] = {}  # (measurement, attention, length, frequencies) -> its records
    steps = [(m, a, n) for m in settings.scalings for a in config.attention for n in settings.lengths]
    for scaling_name, attention, length in tqdm(steps, desc=f"measure {subject.setting.run}", unit="setting"):
        setting = dataclasses.replace(base, scaling=scaling_name, attention=attention)
        note = settings.note(attention, length)
        if note is not None:
            for measurement in measurements:
                results.add(measurement.does_not_apply(setting, length, note))
            continue
        scaling = scaling_for(scaling_name, length, trained, config.scaling_factor, searched)
        reading = Reading(model, dataclasses.replace(setting, factor=scaling.factor), length, settings.served[attention],
                          scaling)
        # A scaling that leaves this length's frequencies as another left them (every static one at factor 1,
        # i.e. up to the training length) computes the same numbers: reuse them, in this setting.
        frequencies = (attention, length, rotary_key(model, scaling, length))
        for measurement in measurements:
            key = (measurement.name, *frequencies)
            if key not in done:
                done[key] = measurement.measure(reading)
            results.add(dataclasses.replace(r, setting=reading.setting) for r in done[key])
    for measurement in measurements:
        results.add(measurement.derive(results))
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


def evaluate(config: EvalConfig, device: torch.device, sources: Optional[list] = None) -> Results:
    """Every (checkpoint × scaling × attention × length) measurement of the checkpoints config names (or of
    `sources`, model_sources(config) found by the caller): each run its own kind (task accuracy for runs trained on
    a synthetic task, perplexity and the rest otherwise).

    Before measuring anything: an attention method that none of the runs can serve (or whose knobs fit none of
    their training lengths) is an error naming it; one that some runs cannot serve is skipped for those."""
    sources = [(run, source_config(run, config)) for run in (model_sources(config) if sources is None else sources)]
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
    log.info(forecast(sources, config))
    dtype, reason = eval_dtype(config.precision, device)
    results = Results(precision=str(dtype).removeprefix("torch."), precision_reason=reason)
    # bf16: the matmuls under autocast; losses, norms, softmax statistics and rotary angles stay float32.
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for run in runs:
            results.extend(evaluate_run(run, config, device))
    return results
