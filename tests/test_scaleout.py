"""Scale-out on existing engines: sweeps through Hydra's submitit launcher (its local executor here; on SLURM
hydra/launcher=slurm, checked down to the sbatch script submitit writes), DDP over srun's tasks (Lightning's
SLURM environment, read from the variables srun sets), and FSDP (trainer=fsdp), whose sharding, clipping and
full-state checkpoint run on two CPU processes over gloo through torch's FSDP with the strategy's own settings:
Lightning's FSDPStrategy refuses accelerator=cpu, and past that check torch's FSDP refuses a CPU module unless it
is given the CPU as its device, which Lightning never passes (docs/cluster.md)."""

from __future__ import annotations

import dataclasses
import json
import shlex
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra import compose

from minillm.model.config import ModelConfig
from minillm.model.transformer import Block
from minillm.runs import load_model
from minillm.train.config import OptimConfig, TrainerConfig
from minillm.train.run import ShardedGradientClipping, fsdp_strategy, trainer_kwargs
from minillm.train.task import LanguageModelTask, parameter_groups
from test_eval_script import make_commands
from test_train_script import RESULT_LINE, assert_ok, compose_run, hydra_conf, summary, train
from test_train_script import env, serial_sweep, shared  # noqa: F401  (fixtures of the script tests)

# ----------------------------------------------------------------------------------------------
# Sweeps through the submitit launcher


@pytest.mark.slow
def test_submitit_local_sweep_trains_what_the_serial_one_does(tmp_path, env, serial_sweep):
    """Each run of the sweep is a job of submitit's local executor (a process of its own, as a SLURM job is on
    a cluster): the runs, their folders and their losses are the serial sweep's, and each job's log has its
    result line."""
    arguments, serial = serial_sweep
    done = train(env, *arguments, "hydra/launcher=submitit_local", f"hydra.sweep.dir={tmp_path}")
    assert_ok(done)
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert runs == sorted(p.name for p in serial.iterdir() if p.is_dir()) and len(runs) == 2
    for run in runs:
        alone, as_job = summary(serial / run), summary(tmp_path / run)
        assert as_job["steps"] == alone["steps"] and as_job["world_size"] == 1
        assert as_job["val_loss"] == alone["val_loss"]  # the same seed, data and one thread: bitwise
    # A job's stdout is its log (<sweep dir>/.submitit/<job id>/<job id>_0_log.out), its line flushed there.
    logs = sorted(tmp_path.glob(".submitit/*/*_0_log.out"))
    lines = [RESULT_LINE.search(log.read_text()) for log in logs]
    assert len(logs) == 2 and all(lines)
    assert sorted(Path(line[3]).name for line in lines) == runs


def launcher(*overrides: str):
    """hydra.launcher as a run's command line composes it."""
    with hydra_conf():
        return compose("config", overrides=list(overrides), return_hydra_config=True).hydra.launcher


def test_the_slurm_launcher_gives_each_run_one_gpu_and_takes_the_clusters_settings():
    slurm = launcher("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30")
    assert slurm._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (slurm.gpus_per_node, slurm.tasks_per_node, slurm.nodes) == (1, 1, 1)
    assert (slurm.cpus_per_task, slurm.mem_gb) == (8, 64)
    assert (slurm.partition, slurm.timeout_min) == ("gpu", 30)
    assert launcher("hydra/launcher=submitit_slurm").gpus_per_node is None  # the plugin's own, left as it is


def test_the_slurm_launcher_writes_one_gpu_per_run_into_the_sbatch_script(tmp_path, monkeypatch):
    """The launcher's own launch() with submitit's own sbatch writer; only the submission is left out (no SLURM
    here): srun is taken as present, and the job array is rendered instead of submitted."""
    import submitit
    from hydra.utils import instantiate
    from submitit.slurm.slurm import SlurmExecutor

    with hydra_conf():
        config = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                              f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True)
    scripts = []
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # what finding srun returns
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", lambda executor, function, *jobs: scripts.append(
        executor._executor._make_submission_file_text("python -m submitit.core._submit", "0")) or [])
    slurm = instantiate(config.hydra.launcher)
    slurm.config = config
    assert slurm.launch([["rope=alibi"], ["rope=complex"]], initial_job_idx=0) == []
    (script,) = scripts
    lines = set(script.splitlines())
    assert {"#SBATCH --gpus-per-node=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --nodes=1",
            "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "#SBATCH --time=720",
            "#SBATCH --partition=gpu", f"#SBATCH --output={tmp_path}/.submitit/%j/%j_0_log.out"} <= lines


def test_make_sends_every_training_sweep_of_a_study_to_the_cluster():
    commands = make_commands("extrapolation", "CLUSTER=slurm hydra.launcher.partition=gpu",
                             "ARGS=trainer.accelerator=gpu")
    sweeps = [c for c in commands if "scripts/train.py" in c]
    assert len(sweeps) == 6 and all(" -m " in c and "joblib" not in c for c in sweeps)
    assert all(" hydra/launcher=slurm hydra.launcher.partition=gpu trainer.accelerator=gpu " in c for c in sweeps)
    overrides = shlex.split(sweeps[0])[3:]  # after .venv/bin/python scripts/train.py -m
    slurm = launcher(*overrides)
    assert (slurm.partition, slurm.gpus_per_node) == ("gpu", 1)
    assert compose_run(*[o for o in overrides if not o.startswith("hydra")]).trainer.accelerator == "gpu"
    assert all("hydra/launcher" not in c for c in commands if "scripts/train.py" not in c)  # evaluations stay


# ----------------------------------------------------------------------------------------------
# Several nodes: Lightning reads srun's tasks

SRUN_TASK = {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2", "SLURM_PROCID": "3",
             "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242",
             "SLURM_STEP_ID": "0", "SLURM_JOB_NAME": "train"}  # the last of 4 tasks, 2 per node on 2 nodes


@pytest.fixture
def srun_task(monkeypatch):
    """This process as srun's task 3 of 4; Lightning's global rank (which a Trainer sets) and the rendezvous
    variables (which its SLURM environment sets) restored after."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank
    from lightning_utilities.core.rank_zero import rank_zero_only as utilities_rank

    for rank_zero_only in (fabric_rank, utilities_rank):
        monkeypatch.setattr(rank_zero_only, "rank", getattr(rank_zero_only, "rank", 0), raising=False)
    for key, value in SRUN_TASK.items():
        monkeypatch.setenv(key, value)
    for key in ("MASTER_ADDR", "MASTER_PORT"):  # unset, as under srun; Lightning's SLURMEnvironment sets them
        monkeypatch.setenv(key, "")  # recorded as they were, so that what Lightning writes is undone after
        monkeypatch.delenv(key)


def test_ddp_under_srun_takes_its_ranks_from_slurm_and_refuses_another_layout(tmp_path, srun_task, monkeypatch):
    import lightning as L
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from minillm.console import unique_suffix
    from minillm.train.run import check_launch

    trainer = L.Trainer(**trainer_kwargs(compose_run("trainer=ddp_cpu", "trainer.num_nodes=2"), tmp_path, "32-true"))
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.creates_processes_externally
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (4, 3, 1, 1)
    assert environment.main_address == "gpu07"  # the first node of the job
    check_launch(trainer)
    # One device per node against srun's 2 tasks per node: Lightning alone would train with rank 3 of 2 replicas.
    run = compose_run("trainer=ddp_cpu", "trainer.num_nodes=2", "trainer.devices=1")
    mismatched = L.Trainer(**trainer_kwargs(run, tmp_path, "32-true"))
    assert mismatched.strategy.distributed_sampler_kwargs == {"num_replicas": 2, "rank": 3}
    with pytest.raises(ValueError, match=r"^You set `devices=1` in Lightning, but the number of tasks per node "
                                         r"configured in SLURM `--ntasks-per-node=2` does not match"):
        check_launch(mismatched)
    # Every task names the same run folder suffix (from the job's ids, not drawn at random).
    mine = unique_suffix()
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert unique_suffix() == mine


# ----------------------------------------------------------------------------------------------
# FSDP


def test_fsdp_trainer_shards_each_block_with_full_state_checkpoints(tmp_path):
    run = compose_run("trainer=fsdp", "trainer.sharding=hybrid_shard", "trainer.activation_checkpointing=true")
    assert (run.trainer.accelerator, run.trainer.devices, run.trainer.strategy) == ("gpu", -1, "fsdp")
    arguments = trainer_kwargs(run, tmp_path, "bf16-mixed")
    strategy = arguments["strategy"]
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy

    assert type(strategy) is FSDPStrategy and strategy.sharding_strategy is ShardingStrategy.HYBRID_SHARD
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block} and strategy.kwargs["use_orig_params"]
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy._state_dict_type == "full"  # one file, as every other run's checkpoint
    assert strategy.mixed_precision == MixedPrecision()  # no casting of FSDP's own: bf16-mixed is autocast
    # Lightning's clipping is off (its FSDP precision refuses to clip by norm); the callback clips instead.
    clipping = [c for c in arguments["callbacks"] if isinstance(c, ShardedGradientClipping)]
    assert arguments["gradient_clip_val"] is None and [c.max_norm for c in clipping] == [1.0]
    unsharded = trainer_kwargs(compose_run("trainer=ddp"), tmp_path, "bf16-mixed")
    assert unsharded["strategy"] == "ddp" and unsharded["gradient_clip_val"] == 1.0
    assert not any(isinstance(c, ShardedGradientClipping) for c in unsharded["callbacks"])


def test_lightning_refuses_fsdp_on_the_cpu(tmp_path):
    """Why no run here trains with trainer=fsdp: Lightning's FSDPStrategy takes GPUs only (its accelerator
    connector's check), which a training command says in one line naming the settings (minillm.train.run)."""
    import lightning as L

    run = compose_run("trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true")
    with pytest.raises(ValueError, match=r"^The strategy `fsdp` requires a GPU accelerator, but received "
                                         r"`accelerator='cpu'`"):
        L.Trainer(**trainer_kwargs(run, tmp_path, "32-true"))


@pytest.mark.parametrize("setting", ["trainer.sharding=shard_grad_op", "trainer.activation_checkpointing=true"])
def test_fsdp_knobs_are_refused_without_fsdp(setting):
    with pytest.raises(ValueError, match=rf"^trainer\.{setting.split('.')[1].split('=')[0]}: applies to "
                                         r"trainer\.strategy=fsdp only \(trainer=fsdp\), not 'ddp'"):
        compose_run("trainer=ddp", setting)


def test_fsdp_sharding_is_one_of_torchs():
    with pytest.raises(ValueError, match=r"^trainer\.sharding: got 'zero3', expected one of \['full_shard', "):
        TrainerConfig(strategy="fsdp", sharding="zero3")


TINY = ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=2)
MAX_NORM, LR = 0.05, 0.5  # a norm the first gradient exceeds, so that clipping acts; SGD, so that it shows


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, TINY.vocab_size, (4, TINY.context_length + 1), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def task() -> LanguageModelTask:
    torch.manual_seed(0)
    return LanguageModelTask(TINY.to_dict(), dataclasses.asdict(OptimConfig()))


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def fsdp_rank(rank: int, port: int, out: str) -> None:
    """One of two ranks: the task wrapped as Lightning's FSDPStrategy wraps it (its arguments; the CPU as
    device), one SGD step on this rank's half of the batch with the gradients clipped by the callback, then the
    full state dict saved by rank 0 as a training checkpoint."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        strategy = fsdp_strategy(TrainerConfig(accelerator="gpu", devices=2, strategy="fsdp"))
        module = task()
        module.configure_model()  # as Lightning calls it, before the strategy wraps the model
        wrapped = FSDP(module, device_id=torch.device("cpu"), sharding_strategy=strategy.sharding_strategy,
                       mixed_precision=strategy.mixed_precision, **strategy.kwargs)
        units = [type(m.module).__name__ for m in wrapped.modules() if isinstance(m, FSDP)]
        local = sum(p.numel() for p in wrapped.parameters())
        decayed = sum(p.numel() for p in module.optimizer_groups()[0]["params"])  # as the task groups
        inputs, targets = batch()
        rows = slice(2 * rank, 2 * rank + 2)
        loss_of(wrapped(inputs[rows]), targets[rows]).backward()  # FSDP averages the ranks' gradients
        ShardedGradientClipping(MAX_NORM).on_before_optimizer_step(
            SimpleNamespace(strategy=SimpleNamespace(model=wrapped)), module, None)
        torch.optim.SGD(wrapped.parameters(), lr=LR).step()
        # What FSDPStrategy saves under "full": the whole state dict, gathered to rank 0. Lightning's context also
        # offloads it to the CPU, which on a CPU device makes torch clone freed storage (SIGSEGV): not here.
        gathered = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, gathered):
            state = wrapped.state_dict()
        if rank == 0:
            torch.save({"state_dict": state, "hyper_parameters": dict(module.hparams), "global_step": 1},
                       Path(out) / "last.ckpt")
        (Path(out) / f"rank{rank}.json").write_text(json.dumps({"units": units, "local": local, "decayed": decayed}))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_on_two_cpu_processes(tmp_path_factory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("fsdp")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    # Forked, so that the ranks start with this process's modules (a spawned rank imports torch and Lightning anew).
    torch.multiprocessing.start_processes(fsdp_rank, args=(port, str(out)), nprocs=2, start_method="fork")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    # The same step on one process: the whole batch, torch's own clipping of the whole gradient.
    reference = task()
    inputs, targets = batch()
    loss_of(reference(inputs), targets).backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM)
    torch.optim.SGD(reference.parameters(), lr=LR).step()
    decayed = sum(p.numel() for p in parameter_groups(task().model, 0.1)[0]["params"])
    return SimpleNamespace(checkpoint=out / "last.ckpt", ranks=ranks, reference=reference.model, norm=float(norm),
                           decayed=decayed)


def test_fsdp_on_cpu_processes_shards_each_block(fsdp_on_two_cpu_processes):
    ranks, total = fsdp_on_two_cpu_processes.ranks, fsdp_on_two_cpu_processes.reference
    assert all(r["units"] == ["LanguageModelTask", "Block", "Block"] for r in ranks)  # the root, then each block
    parameters = sum(p.numel() for p in total.parameters())
    assert sum(r["local"] for r in ranks) == parameters and all(r["local"] < parameters for r in ranks)


def test_fsdp_checkpoint_is_read_by_evaluation_as_one_process_training_the_whole_batch(fsdp_on_two_cpu_processes):
    run = fsdp_on_two_cpu_processes
    assert run.norm > 10 * MAX_NORM  # clipping acted: by the global norm, or the weights would differ
    model = load_model(run.checkpoint)  # the evaluation's reader (scripts/eval_extrapolate.py)
    reference = run.reference.state_dict()
    assert model.state_dict().keys() == reference.keys()
    gap = max(float((model.state_dict()[k] - reference[k]).abs().max()) for k in reference)
    assert gap < 1e-5, gap  # float32: the all-reduce sums the ranks' halves in another order
    moved = max(float((task().model.state_dict()[k] - reference[k]).abs().max()) for k in reference)
    assert moved > 1e-3  # and the step changed the weights well above that


def test_fsdp_decays_the_matrices_a_single_process_does(fsdp_on_two_cpu_processes):
    """Each rank decays its shard of the matrices (the groups taken before FSDP flattened them): together, every
    matrix element a single process decays, and no norm or bias."""
    run = fsdp_on_two_cpu_processes
    assert all(r["decayed"] > 0 for r in run.ranks) and sum(r["decayed"] for r in run.ranks) == run.decayed
