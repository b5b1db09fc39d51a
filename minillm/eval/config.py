"""The evaluation's settings (scripts/eval_extrapolate.py), typed and checked by name."""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Optional

from minillm.data.config import DataConfig
from minillm.data.ruler import RULER_TASKS
from minillm.eval.longrope_factors import RESULT_NAME
from minillm.interop.pretrained import is_pretrained
from minillm.positions.methods import ATTENTION_METHODS
from minillm.positions.scaling import SCALINGS
from minillm.precision import EVAL_PRECISIONS
from minillm.registry import choice, finite, positive, require
from minillm.tracking import LoggerConfig

# Every attention method's knobs, one field per registered method (its config class): the schema of `methods`.
AttentionSettings = make_dataclass("AttentionSettings", [(name, cls, field(default_factory=cls))
                                                         for name, cls in ATTENTION_METHODS.items()])
# The scalings `scalings=all` measures: every one a factor defines (not longrope: its factors are searched per model).
ALL_SCALINGS = [name for name, cls in SCALINGS.items() if cls.from_factor]


@dataclass
class EvalConfig:
    """Length-extrapolation evaluation of trained checkpoints (scripts/eval_extrapolate.py)."""

    # a .ckpt, a run folder, a multirun folder (or a glob of them); hf:<folder or hub id>, or a .gguf file, to
    # import a pretrained model (minillm.interop.pretrained); or a list of these
    ckpt: Any = None
    # The text imported models are read on (trained runs read their own run's validation documents).
    data: DataConfig = field(default_factory=DataConfig)
    trained_length: Optional[int] = None  # imported models' 1x; None: their config's (original) context length
    lengths: Optional[list[int]] = None  # None: 1, 2, 4, 8, 16 × each model's training length
    # The frequency scalings applied to rotary models (others are read as trained): a list, one name, or all (every
    # scaling a factor defines: none, linear, ntk, dynamic_ntk, yarn, dynamic_yarn, llama3, resonance), each a pass
    # as long.
    # Two by default: a default run's evaluation then takes minutes on 2 CPU cores. longrope reads factors searched
    # for the model (scripts/longrope_search.py): longrope_factors, else a run folder's longrope.json.
    scalings: Any = field(default_factory=lambda: ["none", "yarn"])
    longrope_factors: Optional[str] = None  # a result of scripts/longrope_search.py for scalings=[..., longrope]
    scaling_factor: Optional[float] = None  # None: eval length / trained length (dynamic_ntk: 1)
    # the attention methods each model is read under: full, blockwise, sliding, self_extend, rerope, leaky_rerope,
    # lm_infinite, sinks (minillm.positions.methods)
    attention: list[str] = field(default_factory=lambda: ["full"])
    # each attention method's knobs, under its name (methods.self_extend.group=4)
    methods: "AttentionSettings" = field(default_factory=lambda: AttentionSettings())
    logn: bool = False  # scale queries by max(1, log_L(i + 1)) (Qwen's log-n) under every method and scaling
    tail_loss: bool = True  # also the loss on each document's last L tokens with 1x..16x L of context (ReRoPE's)
    stride: Optional[int] = None  # sliding-window evaluation (ALiBi paper); None: non-overlapping windows
    max_documents: int = 8  # long validation documents evaluated at every length
    batch_size: int = 4  # windows per forward pass (fewer at long lengths, to bound the attention's memory)
    buckets: int = 16  # loss-against-position resolution
    # prompts per (length, depth) under every scaling and method; 0 turns passkey retrieval off (10: the full sweep's)
    passkey_trials: int = 3
    # where the key sits in the passkey prompt's filler: 0 its start, 1 its end
    passkey_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    task_examples: int = 64  # test examples per length for runs trained on a synthetic task (data=synthetic)
    # effective length: the share of its score at the training length (1x) each length up to it keeps (NoLiMa's 0.85,
    # arXiv:2502.05167; RULER's own bar is a fixed score: effective_absolute)
    effective_threshold: float = 0.85
    # the 1x score (a task run's exact match, RULER's average) a model needs for a relative effective length: below
    # it the model did not learn the task, and a bar of a fraction of almost nothing passes every length
    effective_min_exact_match: float = 0.5
    # RULER's synthetic tasks (minillm.data.ruler) measured at every setting: a list, one name (niah_single_1, vt,
    # cwe, ...), or all (every task); empty: none
    ruler: Any = field(default_factory=list)
    ruler_samples: int = 8  # RULER samples per (task, length), drawn once from the seed and shared by every setting
    # RULER prompts through the tokenizer's chat template: auto (where it has one), never (completion prompts), always
    ruler_chat: str = "auto"
    # effective length against a fixed score instead (RULER's: Llama-2-7B's 85.6% at 4k is 0.856); None: the
    # relative rule of effective_threshold
    effective_absolute: Optional[float] = None
    longppl: bool = False  # also LongPPL (Fang et al. 2024): perplexity on the tokens that need the long context
    # tokens of context the short pass sees when picking key tokens; None: the model's training length
    longppl_short: Optional[int] = None
    longppl_alpha: float = 2.0  # a key token's log-probability gains more than alpha nats from the long context
    longppl_beta: float = -2.0  # and its full-context log-probability is above beta
    # the model whose losses pick the key tokens (a run folder, .ckpt, hf:..., .gguf); None: each model itself
    longppl_evaluator: Optional[str] = None
    device: str = "auto"  # auto: cuda when available
    # auto: bf16 matmuls where the processor multiplies bf16 natively (minillm.precision), float32 elsewhere
    precision: str = "auto"
    seed: int = 0  # draws the passkeys, their filler and the task examples
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    verbose: bool = False  # show the libraries' console lines too
    overwrite: bool = False  # replace the results already in hydra.run.dir (whole); otherwise such a folder is refused

    def __post_init__(self) -> None:
        require(self.ckpt not in (None, "", []), "ckpt", "name a checkpoint, a run folder or a multirun folder")
        if self.lengths is not None:
            require(len(self.lengths) > 0 and all(n >= 1 for n in self.lengths), "lengths",
                     f"must be positive token counts, got {list(self.lengths)}")
        if self.trained_length is not None:
            require(self.trained_length >= 1, "trained_length", f"must be a positive token count, got "
                     f"{self.trained_length}")
        names = [self.scalings] if isinstance(self.scalings, str) else self.scalings  # scalings=yarn, scalings=all
        require(isinstance(names, (list, tuple)) and len(names) > 0 and all(isinstance(n, str) for n in names),
                 "scalings", f"name scalings: a list, one name, or all; got {self.scalings!r}")
        require("all" not in names or len(names) == 1, "scalings", f"all is every scaling: give it alone, got "
                 f"{list(names)}")
        self.scalings = list(ALL_SCALINGS) if "all" in names else list(names)
        for method in self.scalings:
            choice(method, "scalings", [*SCALINGS, "all"])  # an unknown name is offered all too
        require(self.longrope_factors is None or "longrope" in self.scalings, "longrope_factors",
                f"factors for scalings=[..., longrope], which does not name it: {self.scalings}")
        if "longrope" in self.scalings and self.longrope_factors is None:
            for path in self.checkpoints:  # an imported model has no run folder to hold its factors
                run = Path(str(path)).expanduser()
                then = ", then pass longrope_factors=<its longrope.json>" if is_pretrained(path) else ""
                require(not is_pretrained(path) and not ((run / "config.yaml").is_file() and not (
                    run / RESULT_NAME).is_file()), "scalings", f"longrope needs factors searched for {path}: run "
                        f"scripts/longrope_search.py ckpt={path}{then}")
        for method in self.attention:
            choice(method, "attention", ATTENTION_METHODS)
        if self.scaling_factor is not None:
            positive(self.scaling_factor, "scaling_factor")
        if self.stride is not None:
            require(self.stride > 0, "stride", f"must be positive, got {self.stride}")
        for name in ("max_documents", "batch_size", "buckets", "task_examples"):
            require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        require(self.passkey_trials >= 0, "passkey_trials", f"must be >= 0, got {self.passkey_trials}")
        require(all(0 <= d <= 1 for d in self.passkey_depths), "passkey_depths",
                 f"must lie in [0, 1], got {list(self.passkey_depths)}")
        require(0 < self.effective_threshold <= 1, "effective_threshold",
                 f"must lie in (0, 1] (a share of the exact match at the training length), got "
                 f"{self.effective_threshold}")
        require(0 <= self.effective_min_exact_match <= 1, "effective_min_exact_match",
                 f"must lie in [0, 1] (an exact match at the training length), got {self.effective_min_exact_match}")
        tasks = [self.ruler] if isinstance(self.ruler, str) else self.ruler  # ruler=vt, ruler=all
        require(isinstance(tasks, (list, tuple)) and all(isinstance(t, str) for t in tasks), "ruler",
                 f"name RULER tasks: a list, one name, or all; got {self.ruler!r}")
        require("all" not in tasks or len(tasks) == 1, "ruler", f"all is every task: give it alone, got {list(tasks)}")
        for task in tasks:
            choice(task, "ruler", [*RULER_TASKS, "all"])
        require(len(set(tasks)) == len(tasks), "ruler", f"names a task twice: {list(tasks)}")
        self.ruler = list(RULER_TASKS) if "all" in tasks else list(tasks)
        require(self.ruler_samples > 0, "ruler_samples", f"must be positive, got {self.ruler_samples}")
        choice(self.ruler_chat, "ruler_chat", ("auto", "never", "always"))
        if self.effective_absolute is not None:
            require(0 < self.effective_absolute <= 1, "effective_absolute", f"must lie in (0, 1] (a score: RULER's "
                     f"85.6% is 0.856), got {self.effective_absolute}")
        if self.longppl_short is not None:
            require(self.longppl_short >= 1, "longppl_short", f"must be a positive token count, got "
                     f"{self.longppl_short}")
        choice(self.device, "device", ("auto", "cpu", "cuda", "mps"))
        choice(self.precision, "precision", EVAL_PRECISIONS)
        finite(self, "")  # any float setting the checks above do not bound, now or added later

    def method(self, name: str):
        """The attention method `name` with its knobs from `methods`."""
        return getattr(self.methods, name)

    @property
    def checkpoints(self) -> list[str]:
        return [self.ckpt] if isinstance(self.ckpt, str) else list(self.ckpt)
