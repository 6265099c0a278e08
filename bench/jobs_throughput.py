"""Embedding throughput through the job system, with 1 and 2 worker processes,
and the job system's overhead against calling the embedding function directly.

    .venv/bin/python bench/jobs_throughput.py [--images 300] [--repeats 3] [--chunk-size 64]

Uses the dev database (the embedded PostgreSQL under var/ unless DATABASE_URL
is set), a private Redis and real `celery worker` processes. The images come
from a benchmark dataset "bench-jobs" (imported on first run from the Tux
Paint stamps, or --folder). Each run embeds them with a scratch copy of the
active model version, whose embeddings are deleted before every run and which
is deleted at the end. Prints medians; the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from search import embed_jobs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cbirsite.settings")
os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")

import django  # noqa: E402

django.setup()

import torch  # noqa: E402
from django.conf import settings  # noqa: E402

from search.indexing import embed_images  # noqa: E402
from search.ingest import import_folder  # noqa: E402
from search.models import Dataset, Embedding, Job  # noqa: E402
from tests.workers import RedisServer, Worker  # noqa: E402
from training.models import ModelVersion  # noqa: E402

CORES = os.cpu_count() or 1


def scratch_version() -> ModelVersion:
    active = ModelVersion.active()
    if active is None:
        sys.exit("no active model version: run scripts/cbir up (or build_index) first")
    name = f"bench-jobs-{active.architecture}"
    ModelVersion.objects.filter(name=name).delete()
    from training.versions import copy_version

    return copy_version(active, name, notes="scratch copy for bench/jobs_throughput.py")


def bench_dataset(folder: Path, limit: int) -> tuple[Dataset, list[int]]:
    dataset, created = Dataset.objects.get_or_create(name="bench-jobs")
    if created or dataset.images.count() < limit:
        report = import_folder(folder, dataset)
        print(f"imported {report.imported} image(s) from {folder} into bench-jobs")
    ids = list(dataset.images.order_by("pk").values_list("pk", flat=True)[:limit])
    if len(ids) < limit:
        print(f"note: only {len(ids)} images available")
    return dataset, ids


def run_direct(version: ModelVersion, ids: list[int], threads: int) -> float:
    Embedding.objects.filter(model_version=version).delete()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    report = embed_images(version, ids)
    elapsed = time.perf_counter() - start
    assert report.embedded == len(ids), report.failed[:3]
    return elapsed


def run_direct_same_work(version: ModelVersion, ids: list[int], threads: int) -> float:
    """What an embedding job does besides embedding, in one process: the index
    check and the near-duplicate lookups of the new images."""
    from search.duplicates import flag_new_near_duplicates
    from search.indexing import ensure_hnsw_index

    Embedding.objects.filter(model_version=version).delete()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    report = embed_images(version, ids)
    ensure_hnsw_index(version)
    flag_new_near_duplicates(version, ids)
    elapsed = time.perf_counter() - start
    assert report.embedded == len(ids)
    return elapsed


def run_jobs(version: ModelVersion, dataset: Dataset, n_images: int, chunk_size: int) -> float:
    Embedding.objects.filter(model_version=version).delete()
    Job.objects.filter(model_version=version).delete()
    start = time.perf_counter()
    job = embed_jobs.start_embed_job(version, dataset, chunk_size=chunk_size)
    while True:
        job.refresh_from_db()
        if job.is_finished:
            break
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    assert job.status == "succeeded", job.error
    assert job.result["embedded"] == n_images, job.result
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: CBIR_CHUNK_SIZE")
    parser.add_argument("--folder", default="/usr/share/tuxpaint/stamps")
    args = parser.parse_args()
    args.chunk_size = args.chunk_size or settings.CBIR_CHUNK_SIZE

    dataset, ids = bench_dataset(Path(args.folder), args.images)
    # Only these images: a dataset-wide job embeds exactly them.
    extra = dataset.images.exclude(pk__in=ids)
    if extra.exists():
        extra.delete()
    version = scratch_version()
    tmp = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    redis = RedisServer(tmp)
    redis.start()
    from cbirsite.celery import app

    app.conf.broker_url = redis.url
    base_env = dict(os.environ, REDIS_URL=redis.url, DATABASE_URL=os.environ["DATABASE_URL"],
                    MEDIA_ROOT=str(settings.MEDIA_ROOT), PYTHONUNBUFFERED="1")
    print(f"{len(ids)} images, model {version.architecture}, batch {settings.CBIR_EMBED_BATCH_SIZE}, "
          f"chunk {args.chunk_size}, {CORES} cores, loader workers {settings.CBIR_LOADER_WORKERS}")
    results: dict[str, list[float]] = {"direct (1 process)": [], "direct, same work": [], "jobs, 1 worker": [],
                                       "jobs, 2 workers": []}
    try:
        run_direct(version, ids, threads=CORES)  # warm-up: loads the network in this process
        for _ in range(args.repeats):
            results["direct (1 process)"].append(run_direct(version, ids, threads=CORES))
            results["direct, same work"].append(run_direct_same_work(version, ids, threads=CORES))
        for n_workers in (1, 2):
            threads = max(1, CORES // n_workers)
            workers = []
            for w in range(n_workers):
                env = dict(base_env, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
                workers.append(Worker(f"bench{w}", env, tmp / f"worker{w}.log").start())
            for worker in workers:
                worker.wait_ready(app)
            run_jobs(version, dataset, len(ids), args.chunk_size)  # warm-up: loads the network in each worker
            for _ in range(args.repeats):
                results[f"jobs, {n_workers} worker{'s' if n_workers > 1 else ''}"].append(
                    run_jobs(version, dataset, len(ids), args.chunk_size))
            for worker in workers:
                worker.stop()
    finally:
        redis.stop()
        Job.objects.filter(model_version=version).delete()
        version.delete()

    print(f"\n{'mode':<22} {'median s':>9} {'img/s':>8}   runs (s)")  # noqa: E501
    medians = {}
    for mode, times in results.items():
        medians[mode] = statistics.median(times)
        print(f"{mode:<22} {medians[mode]:>9.2f} {len(ids) / medians[mode]:>8.1f}   "
              + ", ".join(f"{t:.2f}" for t in times))
    overhead = medians["jobs, 1 worker"] / medians["direct (1 process)"]
    same = medians["jobs, 1 worker"] / medians["direct, same work"]
    print(f"\njob system overhead (jobs, 1 worker / direct embedding): {overhead:.3f}  (goal <= 1.10)")
    print(f"job system overhead (jobs, 1 worker / direct, same work incl. index and near-duplicates): {same:.3f}")
    print(f"2 workers / 1 worker speed-up: {medians['jobs, 1 worker'] / medians['jobs, 2 workers']:.2f}x")


if __name__ == "__main__":
    main()
