"""LongRoPE's evolutionary search of per-frequency rescale factors (Ding et al. 2024, arXiv:2402.13753, sec. 3.2,
Algorithm 1), scored by perplexity at the target length; its resumable log and its result file."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from minillm.data.config import DataConfig
from minillm.eval.longrope_factors import default_result, model_identity
from minillm.files import write_atomic
from minillm.positions.scaling import LinearScaling, LongRopeScaling, NTKScaling, YarnScaling, rotary_inv_freq
from minillm.precision import EVAL_PRECISIONS
from minillm.registry import choice, finite, positive, require

log = logging.getLogger("minillm")

LOG_SUFFIX = ".search.jsonl"  # the log lies beside the result: longrope.json -> longrope.search.jsonl
SEEDS = ("pi", "ntk", "yarn")  # the candidates the first population starts from (the paper's sec. 3.2)


@dataclass
class LongRopeSearchConfig:
    """LongRoPE's factor search for one model (scripts/longrope_search.py)."""

    # the model: a run folder or .ckpt, hf:<folder>, or a .gguf file (as the evaluation's ckpt)
    ckpt: Optional[str] = None
    # the text imported models are scored on (a run scores its own validation documents): data=sotu, whose long
    # addresses hold 32k-token windows
    data: DataConfig = field(default_factory=DataConfig)
    trained_length: Optional[int] = None  # imported models' L0; None: their config's (original) context length
    factor: float = 4.0  # the extension s searched for when target_length is None: target = s × L0
    target_length: Optional[int] = None  # the length the factors are for; given, s = target_length / L0
    fitness_length: Optional[int] = None  # tokens per scored window, past L0; None: the target length
    windows: int = 1  # held-out windows scored per candidate, one forward each (the longest documents' first tokens)
    # tokens skipped at each document's start: score other tokens than an evaluation reads (each document's first)
    skip_tokens: int = 0
    population: int = 8  # candidates per generation, the first one seeded from PI, NTK and YaRN
    parents: int = 4  # the best candidates kept each generation (top-k), the others replaced by their children
    generations: int = 3  # generations after the first population
    evaluations: Optional[int] = None  # candidates scored at most, seeds included; None: what the generations need
    mutation_rate: float = 0.3  # each factor's chance of being redrawn in a mutation (the reference's 0.3)
    step: float = 0.01  # the factors' grid (the paper's 0.01)
    max_factor: Optional[float] = None  # the largest factor a mutation draws; None: 1.25 × s (the paper's bound)
    seed: int = 0  # draws the mutations and crossovers
    # the result file; None: <run folder>/longrope.json for a run, outputs/longrope/<model>/longrope.json otherwise
    out: Optional[str] = None
    device: str = "auto"  # auto: cuda when available
    precision: str = "auto"  # the evaluation's precision: auto (bf16 where the processor has it), float32 or bf16
    verbose: bool = False  # show the libraries' console lines too

    def __post_init__(self) -> None:
        require(self.ckpt not in (None, ""), "ckpt", "name one model: a run folder, a .ckpt, hf:<folder> or a .gguf")
        positive(self.factor, "factor")
        require(self.factor > 1, "factor", f"must extend the context (> 1), got {self.factor}")
        for name in ("trained_length", "target_length", "fitness_length", "evaluations"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, f"must be a positive whole number, got {value}")
        for name in ("windows", "population", "parents"):
            require(getattr(self, name) >= 1, name, f"must be positive, got {getattr(self, name)}")
        for name in ("generations", "skip_tokens"):
            require(getattr(self, name) >= 0, name, f"must be non-negative, got {getattr(self, name)}")
        require(self.parents <= self.population, "parents",
                f"keeps the best of a generation: at most population={self.population}, got {self.parents}")
        require(0 < self.mutation_rate <= 1, "mutation_rate", f"must lie in (0, 1], got {self.mutation_rate}")
        positive(self.step, "step")
        if self.max_factor is not None:
            positive(self.max_factor, "max_factor")
        choice(self.device, "device", ("auto", "cpu", "cuda", "mps"))
        choice(self.precision, "precision", EVAL_PRECISIONS)
        finite(self, "")

    def lengths(self, trained: int) -> tuple[float, int, int]:
        """(s, the target length, the fitness length) for a model trained at `trained` tokens."""
        target = self.target_length if self.target_length is not None else math.ceil(self.factor * trained)
        require(target > trained, "target_length", f"must exceed the trained length {trained}, got {target}")
        fitness = self.fitness_length if self.fitness_length is not None else target
        require(fitness > trained, "fitness_length", f"long factors apply past the trained length {trained}: "
                f"score windows longer than it, got {fitness}")
        return target / trained, target, fitness

    @property
    def budget(self) -> int:
        """Candidates scored at most: the first population and each generation's children, or `evaluations`."""
        needed = self.population + self.generations * (self.population - self.parents)
        return needed if self.evaluations is None else min(needed, self.evaluations)


# ----------------------------------------------------------------------------------------------
# The candidates: factors λ_i ≥ 1, one per rotary frequency θ_i (i = 0 the fastest), read as θ_i / λ_i


def seed_factors(theta: float, rotary_dim: int, trained: int, scale: float) -> dict[str, np.ndarray]:
    """λ_i = θ_i / θ'_i of position interpolation (s everywhere), NTK-aware (s^(2i/(d−2))) and YaRN (1 for fast
    pairs, s for slow ones, a ramp between), the starting points of the paper's sec. 3.2, each monotone."""
    base = rotary_inv_freq(theta, rotary_dim)
    scalings = {"pi": LinearScaling(factor=scale), "ntk": NTKScaling(factor=scale),
                "yarn": YarnScaling(factor=scale, original_max_position=trained)}
    seeds = {}
    for name, scaling in scalings.items():
        if name == "ntk" and rotary_dim <= 2:  # NTK's base exponent d/(d−2) needs d > 2
            continue
        seeds[name] = (base / scaling.frequencies(theta, rotary_dim, trained)[0]).numpy()
    return seeds


def monotone(factors: np.ndarray) -> bool:
    """The search's constraint: λ_i never decreases from the fastest frequency to the slowest (sec. 3.2)."""
    return bool(np.all(np.diff(factors) >= 0))


class Evolution:
    """Mutation and crossover under the monotone constraint (the reference's `DimMonoGeneticAlgorithm`'s rules,
    written anew): no candidate is proposed twice."""

    def __init__(self, settings: LongRopeSearchConfig, scale: float, rng: np.random.Generator):
        self.rate, self.step, self.rng = settings.mutation_rate, settings.step, rng
        self.ceiling = settings.max_factor if settings.max_factor is not None else 1.25 * scale
        require(self.ceiling >= scale, "max_factor", f"must reach s = {scale:g} (PI's factor), got {self.ceiling}")
        self.seen: set[tuple] = set()

    def new(self, factors: np.ndarray) -> bool:
        """Whether `factors` was never proposed (and now is)."""
        key = tuple(np.round(factors, 9))
        if key in self.seen:
            return False
        self.seen.add(key)
        return True

    def mutate(self, parent: np.ndarray, tries: int = 100) -> Optional[np.ndarray]:
        """Each λ_i redrawn with probability mutation_rate on the grid between its neighbours (λ_{i−1} .. λ_{i+1};
        1 below the first, max_factor above the last), so the child stays monotone; None when no new one is found."""
        for _ in range(tries):
            child = parent.copy()
            for i in range(len(child)):
                if self.rng.random() >= self.rate:
                    continue
                low = child[i - 1] if i > 0 else 1.0
                high = child[i + 1] if i + 1 < len(child) else self.ceiling
                steps = int(math.floor((high - low) / self.step + 1e-9))
                child[i] = low + self.step * int(self.rng.integers(0, steps + 1))
            if monotone(child) and self.new(child):
                return child
        return None

    def crossover(self, first: np.ndarray, second: np.ndarray, tries: int = 20) -> Optional[np.ndarray]:
        """The first parent with a span of λ_i taken from the second (two points drawn at random), kept when
        monotone and new; None when no try gives one. A span, not each λ_i by a coin: two monotone parents
        mixed factor by factor are rarely monotone."""
        if np.array_equal(first, second):
            return None
        for _ in range(tries):
            start, end = sorted(self.rng.choice(len(first) + 1, 2, replace=False))
            child = first.copy()
            child[start:end] = second[start:end]
            if monotone(child) and self.new(child):
                return child
        return None


# ----------------------------------------------------------------------------------------------
# The log: one JSON line per scored candidate after a header naming the search


class SearchLog:
    """The search's JSONL log: a header (what was searched: model, lengths, tokens, settings), then one line per
    scored candidate. A rerun reads it back and scores only what it lacks; a torn last line is dropped."""

    def __init__(self, path: Path, identity: dict):
        self.path, self.records = path, {}
        if not path.exists():
            write_atomic(path, json.dumps({"search": identity}) + "\n")
            return
        text = path.read_text()
        whole = text[:text.rfind("\n") + 1]  # a line cut by a kill has no newline yet: dropped, scored again
        rows = []
        for number, line in enumerate(whole.splitlines(), 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"log: {path} line {number} is not JSON; remove the file to search afresh") from None
        written = rows[0].get("search") if rows and isinstance(rows[0], dict) else None
        require(isinstance(written, dict), "log", f"{path} is not a LongRoPE search log (no header line)")
        for key in sorted(set(identity) | set(written)):
            require(written.get(key) == identity.get(key), "log", f"{path} was written by another search: {key} "
                    f"{written.get(key)!r} there, {identity.get(key)!r} here; remove it or choose another out=")
        self.records = {row["index"]: row for row in rows[1:]}
        if len(whole) < len(text):
            write_atomic(path, whole)

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------
# The search


@dataclass
class Candidate:
    """One scored set of long factors: where it came from, and its perplexity at the fitness length."""

    index: int  # its place in the search's order (the log's key)
    generation: int  # 0: the first population
    origin: str  # pi, ntk, yarn, mutation or crossover
    factors: np.ndarray  # λ_i, rotary_dim/2 of them
    loss: float  # mean loss of the scored windows' targets
    ppl: float  # exp(loss): the fitness, lower is better
    seconds: float  # wall time of its forwards (as logged when read back)

    def record(self) -> dict:
        return {"index": self.index, "generation": self.generation, "origin": self.origin,
                "long_factor": [float(v) for v in self.factors], "loss": self.loss, "ppl": self.ppl,
                "seconds": self.seconds}


Score = Callable[[np.ndarray], tuple[float, float, float]]  # factors -> (loss, ppl, seconds)


def evolve(score: Score, seeds: dict[str, np.ndarray], settings: LongRopeSearchConfig, scale: float,
           search_log: SearchLog, progress: Optional[Callable[[Candidate, bool], None]] = None) -> list[Candidate]:
    """Algorithm 1 of the paper: a first population of the seeds and their mutations, then each generation the
    `parents` best kept and the rest replaced by their mutations and crossovers (half each), until `generations`
    or the budget of evaluations ends. Candidates the log holds are read from it, not scored again, so a rerun
    proposes the same candidates in the same order. Every candidate, in order."""
    rng = np.random.default_rng(settings.seed)
    evolution, scored = Evolution(settings, scale, rng), []

    def take(factors: Optional[np.ndarray], generation: int, origin: str) -> Optional[Candidate]:
        if factors is None or len(scored) >= settings.budget:
            return None
        index, logged = len(scored), search_log.records.get(len(scored))
        if logged is not None:
            require(np.array_equal(np.asarray(logged["long_factor"]), factors), "log",
                    f"{search_log.path} candidate {index} differs from this search's: remove it to search afresh")
            candidate = Candidate(index, generation, origin, factors, logged["loss"], logged["ppl"], logged["seconds"])
        else:
            loss, ppl, seconds = score(factors)
            candidate = Candidate(index, generation, origin, factors, loss, ppl, round(seconds, 3))
            search_log.append(candidate.record())
        scored.append(candidate)
        if progress is not None:
            progress(candidate, logged is not None)
        return candidate

    population = [c for name, factors in seeds.items() if evolution.new(factors)
                  for c in [take(factors, 0, name)] if c is not None]
    for i in range(settings.population - len(population)):
        child = take(evolution.mutate(list(seeds.values())[i % len(seeds)]), 0, "mutation")
        population += [child] if child is not None else []
    for generation in range(1, settings.generations + 1):
        if len(scored) >= settings.budget:
            break
        parents = sorted(population, key=rank)[:settings.parents]
        children = []
        for i in range(settings.population - len(parents)):
            if i % 2 == 1 and len(parents) >= 2:
                first, second = sorted(rng.choice(len(parents), 2, replace=False))
                factors = evolution.crossover(parents[first].factors, parents[second].factors)
                child = take(factors if factors is not None else evolution.mutate(parents[first].factors),
                             generation, "crossover" if factors is not None else "mutation")
            else:
                child = take(evolution.mutate(parents[int(rng.integers(len(parents)))].factors), generation, "mutation")
            children += [child] if child is not None else []
        population = parents + children
    return scored


def rank(candidate: Candidate) -> tuple[float, int]:
    """Lower perplexity first, the earlier candidate on a tie; a non-finite one last."""
    return (candidate.ppl if math.isfinite(candidate.ppl) else math.inf), candidate.index


def log_path(result: Path) -> Path:
    return result.with_name(result.name.removesuffix(".json") + LOG_SUFFIX)


def write_result(path: Path, candidates: list[Candidate], identity: dict, scale: float, trained: int) -> dict:
    """The result file: LongRopeScaling's fields (short factors 1: the model as trained up to L0), the model's
    identity, the search's lengths, the fitness of every seed and of the best candidate."""
    best = min(candidates, key=rank)
    result = {"type": "longrope", "factor": scale, "original_max_position": trained,
              "short_factor": [1.0] * len(best.factors), "long_factor": [float(v) for v in best.factors],
              **{key: identity[key] for key in ("model", "target_length", "fitness_length", "windows")},
              "seeds": {c.origin: {"ppl": c.ppl, "loss": c.loss} for c in candidates if c.origin in SEEDS},
              "best": {"ppl": best.ppl, "loss": best.loss, "index": best.index, "origin": best.origin,
                       "generation": best.generation},
              "evaluations": len(candidates), "log": str(log_path(path))}
    write_atomic(path, json.dumps(result, indent=1) + "\n")
    return result


def search_identity(settings: LongRopeSearchConfig, model: dict, scale: float, target: int, fitness: int,
                    tokens: torch.Tensor, precision: str) -> dict:
    """What a log belongs to: the model, the lengths, the scored tokens, and every setting that changes which
    candidates are proposed (not the budget: a larger one continues the same search)."""
    knobs = ("population", "parents", "mutation_rate", "step", "max_factor", "seed")
    return {"model": model, "factor": scale, "target_length": target, "fitness_length": fitness,
            "windows": settings.windows, "tokens_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
            "precision": precision, **{k: getattr(settings, k) for k in knobs}}


def fitness(model, tokens: torch.Tensor, length: int, scaling_of: Callable[[np.ndarray], LongRopeScaling]) -> Score:
    """The score of a candidate: perplexity of `tokens` (windows × length + 1) with one forward per window."""
    from minillm.eval.perplexity import perplexity_at_length

    def score(factors: np.ndarray) -> tuple[float, float, float]:
        started = time.perf_counter()
        measured = perplexity_at_length(model, tokens, length, scaling=scaling_of(factors), batch_size=1, buckets=1)
        return measured.loss, measured.ppl, time.perf_counter() - started

    return score


def run_search(settings: LongRopeSearchConfig) -> tuple[Path, dict]:
    """Load the model and its held-out text, search, write the result: (its path, its contents)."""
    from tqdm.auto import tqdm

    from minillm.console import shares_console
    from minillm.eval.perplexity import evaluation_tokens
    from minillm.eval.run import _device  # the evaluation's device rule (this room's)
    from minillm.eval.sources import pretrained_documents, trained_subject
    from minillm.interop.pretrained import PretrainedSource, is_pretrained
    from minillm.positions.rotary import RotaryEmbedding
    from minillm.precision import eval_dtype
    from minillm.runs import find_runs

    if is_pretrained(settings.ckpt):
        source = PretrainedSource.parse(settings.ckpt)
        imported = source.load(settings.trained_length)
        model, location, is_run = imported.model, source.location, False
        documents = pretrained_documents(imported.tokenizer, settings.data)
    else:
        runs = find_runs(settings.ckpt, settings.data.cache_dir)
        require(len(runs) == 1, "ckpt", f"{settings.ckpt} names {len(runs)} runs; name one run folder or checkpoint")
        subject = trained_subject(runs[0], torch.device("cpu"))
        model, location, is_run, documents = subject.model, str(runs[0].checkpoint), True, subject.documents
    device = _device(settings.device)
    model = model.to(device).eval()
    rope = model.position
    require(isinstance(rope, RotaryEmbedding), "ckpt", f"{location} has {model.cfg.rope.variant} positions: "
            f"LongRoPE rescales rotary frequencies")
    trained = model.cfg.context_length
    scale, target, length = settings.lengths(trained)
    documents = [document[settings.skip_tokens:] for document in documents]
    try:
        tokens = evaluation_tokens(documents, length, settings.windows)
    except ValueError:
        skipped = f" after skip_tokens={settings.skip_tokens}" if settings.skip_tokens else ""
        raise ValueError(f"fitness_length: no held-out document of {location} has {length + 1} tokens{skipped} "
                         f"(longest: {max((len(d) for d in documents), default=0)}); choose longer text (data=sotu) "
                         f"or a shorter fitness_length") from None
    dtype, _ = eval_dtype(settings.precision, device)
    out = Path(settings.out).expanduser() if settings.out is not None else default_result(location, is_run)
    identity = search_identity(settings, model_identity(location), scale, target, length, tokens,
                               str(dtype).removeprefix("torch."))
    search_log = SearchLog(log_path(out), identity)
    seeds = seed_factors(rope.theta, rope.rotary_dim, trained, scale)

    def scaling_of(factors: np.ndarray) -> LongRopeScaling:
        return LongRopeScaling(factor=scale, original_max_position=trained, short_factor=[1.0] * len(factors),
                               long_factor=[float(v) for v in factors])

    bar = tqdm(total=settings.budget, desc="longrope search", unit="candidate", disable=shares_console())

    def progress(candidate: Candidate, logged: bool) -> None:
        bar.update(1)
        how = "from the log" if logged else f"{candidate.seconds:.1f} s"
        bar.write(f"candidate {candidate.index} (generation {candidate.generation}, {candidate.origin}): "
                  f"ppl {candidate.ppl:.4f} at {length} tokens, {how}")
        sys.stdout.flush()  # a line per candidate that a log file shows as it comes, minutes apart at 32k

    log.info("longrope search of %s: s = %g (%d -> %d tokens), %d window(s) of %d tokens, at most %d candidates",
             location, scale, trained, target, settings.windows, length, settings.budget)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        candidates = evolve(fitness(model, tokens, length, scaling_of), seeds, settings, scale, search_log, progress)
    bar.close()
    return out, write_result(out, candidates, identity, scale, trained)
