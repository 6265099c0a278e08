"""Training over all GPUs of a host: DistributedDataParallel, one process per
device (TrainConfig.processes > 1; `manage.py train --processes N`).

The calling process (the command, or the Celery worker running the job) is
rank 0; it starts ranks 1..N-1 as `python -m training.core.rank SPEC RANK`
subprocesses (plain subprocesses, so a daemonic Celery child may start them),
which attach to the same rendezvous (tcp://127.0.0.1:<free port>). Backend:
NCCL on CUDA (rank r on cuda:r, BatchNorm synchronised), gloo on the CPU.

- Data: rank 0 reads the dataset's rows and hands them over in the spec file,
  so the other ranks never query the database. Every rank builds the same
  seeded network and plan; a DistributedSampler gives each rank every N-th
  image of the epoch's permutation (seeded by (seed, epoch)), so N processes
  see the same global batches of `batch_size` images as one process does.
- Gradients: DDP all-reduces (averages) the gradients of the network and of
  the objective's parameters (class weights) together: both are wrapped in
  one module (`Joint`).
- Losses: the epoch's training loss is summed over ranks (`Dist.reduce`);
  every rank validates on the whole val split (same weights, same value).
- Only rank 0 writes checkpoints, reports progress and touches the job row;
  the stop decisions (cancel, early stopping, time limit) are rank 0's,
  broadcast to every rank before each batch and each epoch, so all stop together.

Source: PyTorch, "Getting Started with Distributed Data Parallel" and
torch.utils.data.distributed.DistributedSampler
(https://pytorch.org/tutorials/intermediate/ddp_tutorial.html).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from training.core import runtime

TIMEOUT = timedelta(minutes=30)  # a collective waiting longer than this fails (a rank died)
STOP_REASONS = ("completed", "early_stopping", "time_limit")


class Joint(nn.Module):
    """The network and the objective as one module, so DDP synchronises the
    gradients of both (the objective may own class weights)."""

    def __init__(self, model: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: Any, device: torch.device) -> torch.Tensor:
        return self.objective(self.model, batch, device)


def joint_loss(wrapped: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
    """The loss function for training.core.loop with a DDP-wrapped Joint as the model."""
    return wrapped(batch, device)


@dataclass
class Dist:
    """This process's place in the run and its collectives."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def reduce(self, total: float, count: int) -> tuple[float, int]:
        """Sum (loss total, image count) over all ranks."""
        values = torch.tensor([total, float(count)], dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(values)
        return float(values[0]), int(values[1])

    def decide(self, value: int) -> int:
        """Rank 0's `value`, on every rank."""
        tensor = torch.tensor([int(value)], dtype=torch.int64, device=self._collective_device)
        dist.broadcast(tensor, src=0)
        return int(tensor[0])

    def wrap(self, model: nn.Module, objective: nn.Module) -> nn.Module:
        joint: nn.Module = Joint(model, objective)
        if self.device.type == "cuda":
            joint = nn.SyncBatchNorm.convert_sync_batchnorm(joint)
            return nn.parallel.DistributedDataParallel(joint, device_ids=[self.device.index],
                                                       find_unused_parameters=True)
        # Networks may hold parameters the embedding does not use (efficientnet_lite0's ImageNet classifier).
        return nn.parallel.DistributedDataParallel(joint, find_unused_parameters=True)

    @property
    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def device_for(device_type: str, rank: int) -> torch.device:
    if device_type == "cuda":
        if torch.cuda.device_count() <= rank:
            raise RuntimeError(f"rank {rank} needs cuda:{rank}, but PyTorch sees {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init(rank: int, world: int, port: int, device_type: str) -> None:
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=TIMEOUT)


def _cpu_threads(world: int) -> int:
    """Threads per process on the CPU: the cores shared out, not each process using all."""
    return max(1, (os.cpu_count() or 1) // world)


def train_distributed(data, config, checkpoint_dir: Path, progress, should_stop, resume: bool, rank_train):
    """training.core.trainer.train for config.processes > 1, as rank 0; returns rank
    0's TrainResult. rank_train is training.core.trainer._train (each rank's loop)."""
    from training.core.inference import loader_workers, resolve_device
    from training.core.plan import plan_rows

    world = config.processes
    device_type = resolve_device().type
    if device_type == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"processes: {world} asked for, but PyTorch sees {torch.cuda.device_count()} GPU(s)")
    warnings: list[str] = []
    rows = plan_rows(data, warnings)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        for name in ("last.pt", "best.pt"):
            (checkpoint_dir / name).unlink(missing_ok=True)
    settings = asdict(config)
    if settings["num_workers"] is None:
        settings["num_workers"] = loader_workers(torch.device(device_type))
    port = _free_port()
    spec = {"config": settings, "dataset": data.name, "rows": rows, "runtime": runtime.current().to_dict(), "checkpoint_dir": str(checkpoint_dir),
            "resume": resume, "port": port, "world": world, "device": device_type}
    spec_path = checkpoint_dir / "distributed.json"
    spec_path.write_text(json.dumps(spec))
    children = [subprocess.Popen([sys.executable, "-m", "training.core.rank", str(spec_path), str(rank)],
                                 env=os.environ.copy()) for rank in range(1, world)]
    threads = torch.get_num_threads()
    try:
        if device_type == "cpu":
            torch.set_num_threads(_cpu_threads(world))
        _init(0, world, port, device_type)
        result = rank_train(data, config, checkpoint_dir, progress, should_stop, resume,
                        dist_info=Dist(0, world, device_for(device_type, 0)), rows=rows)
    except BaseException:
        for child in children:
            child.kill()
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)
        for child in children:
            try:
                child.wait(timeout=120)
            except subprocess.TimeoutExpired:
                child.kill()
    failed = [(rank, child.returncode) for rank, child in enumerate(children, 1) if child.returncode != 0]
    if failed:
        raise RuntimeError(f"training process(es) {failed} (rank, exit code) failed; see their output")
    result.warnings = warnings + result.warnings
    return result


def run_rank(spec_path: str, rank: int, rank_train) -> int:
    """Ranks 1..N-1 (training/core/rank.py; no Django): train with rank 0's
    settings and rows from the spec file, exit."""
    from training.core.config import TrainConfig
    from training.core.data import TrainingData
    from training.core.runs import TrainingStopped

    spec = json.loads(Path(spec_path).read_text())
    runtime.configure(runtime.Runtime.from_dict(spec["runtime"]))
    config = TrainConfig.from_params(spec["config"])
    world, device_type = int(spec["world"]), spec["device"]
    if device_type == "cpu":
        torch.set_num_threads(_cpu_threads(world))
    device = device_for(device_type, rank)
    _init(rank, world, int(spec["port"]), device_type)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            rows = ([tuple(r) for r in spec["rows"][0]], [tuple(r) for r in spec["rows"][1]])
            rank_train(TrainingData(spec["dataset"], ()), config, Path(spec["checkpoint_dir"]), None, None, bool(spec["resume"]),
                       dist_info=Dist(rank, world, device), rows=rows)
    except TrainingStopped:
        pass
    finally:
        dist.destroy_process_group()
    return 0
