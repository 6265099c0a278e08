"""The "evaluate" job kind, on the "train" queue: started from the admin (or
any caller) with `start_evaluation_job`, run by a worker through
`run_evaluation_job`, which calls the same functions as the `evaluate`
command. Registered in TrainingConfig.ready()."""

from __future__ import annotations

from collections.abc import Callable

from django.db import transaction

from search import jobs, runner
from search.jobs import JobError
from search.models import Dataset, Job
from training.evaluation.retrieval import (
    EvaluationError,
    check_evaluable,
    copy_detection,
    evaluate_version,
    save_copy_detection,
    save_evaluation,
)
from training.models import ModelVersion

KIND = "evaluate"

# Copy detection settings a job uses unless its params say otherwise.
DEFAULT_PER_KIND = 10
DEFAULT_SEED = 0

@transaction.atomic
def start_evaluation_job(version: ModelVersion, dataset: Dataset, *, k: int = 10, copies: bool = True,
                         against: str = "trainval", per_kind: int = DEFAULT_PER_KIND, seed: int = DEFAULT_SEED,
                         user=None, check: bool = True) -> Job:
    """Queue an evaluation of `version` on `dataset` (category retrieval, and
    copy detection when `copies`). Raises JobError, with a message a user can
    act on, when it cannot run (not labelled, not indexed, no worker, already
    queued); the task is sent after the transaction commits."""
    try:
        check_evaluable(version, dataset, against=against)
    except EvaluationError as exc:
        raise JobError(str(exc)) from None
    if check:
        jobs.check_workers_for(KIND)
    running = jobs.active_job(KIND, model_version=version, dataset=dataset)
    if running:
        raise JobError(f"job #{running.pk} is already evaluating {version.name} on {dataset.name}; "
                       f"wait for it or cancel it")
    return jobs.create(KIND, model_version=version, dataset=dataset, user=user,
                       params={"k": k, "copies": copies, "against": against, "per_kind": per_kind, "seed": seed},
                       log=f"queued: evaluate {version.name} on {dataset.name} (k={k}, against {against}"
                           f"{', with copy detection' if copies else ''})")


def _summary(evaluation: dict, copies: dict | None) -> dict:
    """The part of the results worth showing on the job page (the full ones are on the version)."""
    keys = ("k", "n_queries", "against", "precision_at_k", "recall_at_k", "map_at_k", "mean_similar",
            "mean_dissimilar", "ann_recall_at_k", "median_latency_ms", "n_skipped_no_relevant")
    result = {"dataset": evaluation["dataset"], "model": evaluation["model"],
              "evaluation": {key: evaluation[key] for key in keys}}
    if copies is not None:
        result["copy_detection"] = {kind: {"recall_at_1": row["recall_at_1"], "recall_at_10": row["recall_at_10"],
                                           "mean_rank": row["mean_rank"]}
                                    for kind, row in copies["summary"].items()}
    return result


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def _message(evaluation: dict, copies: dict | None) -> str:
    k = evaluation["k"]
    text = (f"P@{k} {_fmt(evaluation['precision_at_k'])}, mAP@{k} {_fmt(evaluation['map_at_k'])} "
            f"over {evaluation['n_queries']} queries")
    if copies is not None:
        text += f"; copy detection R@1 {_fmt(copies['summary']['all']['recall_at_1'])}"
    return text


def run_evaluation_job(job_id: int) -> str:
    """Claim the job, evaluate, save the results on the model version, finish
    (the run_evaluation task). A cancel stops it between queries, saving nothing."""
    return runner.execute(job_id, _evaluate, user_errors=(EvaluationError,))


def _evaluate(run: runner.Run) -> str:
    job = run.job
    params = job.params or {}
    copies_wanted = bool(params.get("copies", True))
    per_kind = int(params.get("per_kind", DEFAULT_PER_KIND))
    stopped = "stopped; nothing saved"

    def phase(offset: int, total_of: Callable[[int], int]):
        def progress(done: int, total: int, message: str) -> None:
            run.progress(offset + done, total_of(total), message)
            run.check_stop(stopped)

        return progress

    if job.model_version is None or job.dataset is None:
        raise EvaluationError("the model version or the dataset of this job was deleted")
    version, dataset = job.model_version, job.dataset
    n_copies = 0
    if copies_wanted:
        from training.evaluation.copies import KINDS

        n_copies = min(per_kind, dataset.images.count()) * len(KINDS)
    evaluation = evaluate_version(version, dataset, k=int(params.get("k", 10)),
                                  against=params.get("against", "trainval"),
                                  progress=phase(0, lambda total: total + n_copies))
    run.log(f"category retrieval: {_message(evaluation, None)}")
    copies = None
    if copies_wanted:
        n_queries = evaluation["n_queries"]
        copies = copy_detection(version, dataset, per_kind=per_kind, seed=int(params.get("seed", DEFAULT_SEED)),
                                progress=phase(n_queries, lambda total: n_queries + total))
    run.check_stop(stopped)
    save_evaluation(version, evaluation)
    if copies is not None:
        save_copy_detection(version, copies)
    message = _message(evaluation, copies)
    run.succeed(result=_summary(evaluation, copies), message=message)
    run.log(f"done: {message}; saved on {version.name}")
    return "done"
