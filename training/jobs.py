"""Starting training jobs (the admin action, the `train --job` command).

The job row holds the run's settings (a validated TrainConfig, as a dict);
`training.tasks.run_training` runs `training.trainer.run_training_job` on a
worker consuming the "train" queue."""

from __future__ import annotations

from dataclasses import asdict

from django.db import transaction

from search.jobs import _send, add_log, check_workers
from search.models import Dataset, Job
from training.trainer import TrainConfig, check_dataset, check_pretrained_available


@transaction.atomic
def start_training_job(dataset: Dataset, *, user=None, check: bool = True, **config_fields) -> Job:
    """Validate the settings against the dataset, then queue a training job.

    Raises ValueError (bad settings, or a dataset the objective cannot train
    on), WeightsUnavailable (pretrained weights missing on an offline site) or
    search.jobs.JobsUnavailable (no broker or no "train" worker, when `check`),
    before any row is created."""
    config = TrainConfig.from_params(config_fields)
    check_dataset(dataset, config)
    check_pretrained_available(config)
    if check:
        check_workers("train")
    from training.tasks import run_training

    job = Job.objects.create(kind=Job.Kind.TRAIN, dataset=dataset, created_by=user, params=asdict(config))
    add_log(job.pk, f"queued: train {config.architecture} on {dataset.name} ({config.objective}, "
                    f"{config.epochs} epoch(s), batch {config.batch_size}, lr {config.learning_rate:g}, "
                    f"{'pretrained' if config.pretrained else 'random'} initial weights"
                    f"{f', {config.image_size} px' if config.image_size else ''})")
    _send(run_training, job)
    return job
