"""Deleting a dataset of N images through the delete job's plain function,
and whether search keeps answering meanwhile.

    .venv/bin/python bench/delete_scale.py [--images 10000 100000] [--repeats 1] [--batch-size 1000]

For each N: a dataset "bench-delete-N" of N placeholder image rows (bulk
inserted like tests/helpers.store_embeddings, each with a small file and a
thumbnail written under a temporary MEDIA_ROOT, an embedding of a scratch
32-d model version and, for one image in ten, a near-duplicate pair), then a
"delete" Job row run by `search.delete_jobs.run_delete_job` in this process
(claim, batches of CBIR_DELETE_BATCH_SIZE rows each in its own transaction,
files released after each commit, the dataset row last). Meanwhile a thread
runs a nearest-neighbour query (search.neighbours.nearest, k=10, over the
whole version, as the public search does) every 0.1 s and records its
latency; the version's HNSW index covers the N rows and 1,000 rows of another
dataset (built once after the fill, not row by row). Each N runs twice: rows
only (no files on disk: the database's share) and rows with their files.
Also printed: the CPU seconds of this process plus its PostgreSQL backend
(less sensitive than wall time to other load on a shared machine) and the
load average. The setup is not timed.

Uses the dev database (the embedded PostgreSQL under var/ unless DATABASE_URL
is set; `manage.py migrate` first); everything it creates is deleted at the
end. Prints a table of medians; the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import median, percentile, setup_django, table  # noqa: E402

setup_django()

import numpy as np  # noqa: E402
from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402

from search.delete_jobs import run_delete_job  # noqa: E402
from search.indexing import drop_hnsw_index, ensure_hnsw_index  # noqa: E402
from search.models import Dataset, Embedding, Image, Job, NearDuplicate  # noqa: E402
from search.neighbours import nearest  # noqa: E402
from training.models import ModelVersion  # noqa: E402
from training.versions import get_or_create_version  # noqa: E402

DIM = 32
INSERT_BATCH = 5000


def scratch_version() -> ModelVersion:
    return get_or_create_version("tiny", random_weights=True, config={"dimension": DIM, "size": 32})


def fill(name: str, n: int, version: ModelVersion, media: Path, *, files: bool = True, pairs: bool = True) -> Dataset:
    Dataset.objects.filter(name=name).delete()
    dataset = Dataset.objects.create(name=name)
    rng = np.random.default_rng(n)
    for start in range(0, n, INSERT_BATCH):
        count = min(INSERT_BATCH, n - start)
        rows = []
        for i in range(start, start + count):
            file, thumb = f"datasets/{dataset.pk}/{i % 256:02x}/{i}.png", f"thumbnails/{dataset.pk}/{i % 256:02x}/{i}.jpg"
            if files:
                for rel in (file, thumb):
                    path = media / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(b"x" * 64)
            rows.append(Image(dataset=dataset, file=file, thumbnail=thumb, sha256=f"{i:064x}", split="train",
                              width=1, height=1, original_filename=f"{i}.png"))
        images = Image.objects.bulk_create(rows)
        vectors = rng.standard_normal((count, DIM)).astype(np.float32)
        Embedding.objects.bulk_create([Embedding(image=im, dataset=dataset, model_version=version, vector=v)
                                       for im, v in zip(images, vectors)])
        if pairs:
            NearDuplicate.objects.bulk_create([
                NearDuplicate(image=images[j + 1], duplicate_of=images[j], similarity=0.99, model_version=version)
                for j in range(0, count - 1, 10)])
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE search_image")
        cursor.execute("ANALYZE search_embedding")
    return dataset


class SearchProbe(threading.Thread):
    """Nearest-neighbour queries on another dataset, back to back, while the delete runs."""

    def __init__(self, version: ModelVersion, image_id: int) -> None:
        super().__init__(daemon=True)
        self.version, self.image_id = version, image_id
        self.latencies: list[float] = []
        self.errors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                start = time.perf_counter()
                try:
                    hits = nearest(self.version, image_id=self.image_id, k=10)
                    assert hits
                except Exception:  # noqa: BLE001 - counted, never hidden
                    self.errors += 1
                self.latencies.append(time.perf_counter() - start)
                time.sleep(0.1)
        finally:
            connection.close()


def backend_cpu_seconds() -> float:
    """CPU seconds (user + system) of this connection's PostgreSQL backend, from /proc (same host only)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(n: int, version: ModelVersion, probe_image: int, media: Path, files: bool) -> dict:
    drop_hnsw_index(version)  # inserting row by row into an HNSW index is slow; build it once instead
    dataset = fill(f"bench-delete-{n}", n, version, media, files=files)
    ensure_hnsw_index(version)
    files_before = sum(1 for p in (media / "datasets" / str(dataset.pk)).rglob("*") if p.is_file())
    job = Job.objects.create(kind="delete", dataset=dataset,
                             params={"dataset_id": dataset.pk, "dataset_name": dataset.name, "total": n})
    probe = SearchProbe(version, probe_image)
    probe.start()
    start, cpu, db_cpu, load = time.perf_counter(), time.process_time(), backend_cpu_seconds(), os.getloadavg()[0]
    outcome = run_delete_job(job.pk)
    seconds = time.perf_counter() - start
    cpu, db_cpu = time.process_time() - cpu, backend_cpu_seconds() - db_cpu
    load = max(load, os.getloadavg()[0])
    probe.stop.set()
    probe.join()
    job.refresh_from_db()
    left_files = sum(1 for folder in ("datasets", "thumbnails") for p in (media / folder / str(dataset.pk)).rglob("*")
                     if p.is_file())
    assert outcome == "done" and job.status == "succeeded", (outcome, job.status, job.error)
    assert not Dataset.objects.filter(pk=dataset.pk).exists() and left_files == 0, left_files
    return {"seconds": seconds, "cpu": cpu, "db_cpu": db_cpu, "load": load, "files": files_before * 2, "search_p50": median(probe.latencies),
            "search_max": max(probe.latencies) if probe.latencies else float("nan"),
            "searches": len(probe.latencies), "errors": probe.errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None, help="CBIR_DELETE_BATCH_SIZE (default: the setting)")
    args = parser.parse_args()
    if args.batch_size:
        settings.CBIR_DELETE_BATCH_SIZE = args.batch_size
    media = Path(tempfile.mkdtemp(prefix="cbir-bench-delete-"))
    settings.MEDIA_ROOT = media
    version = scratch_version()
    probe_dataset = fill("bench-delete-probe", 1000, version, media, files=False, pairs=False)
    ensure_hnsw_index(version)
    probe_image = probe_dataset.images.order_by("pk").values_list("pk", flat=True).first()
    assert probe_image is not None
    idle = SearchProbe(version, probe_image)
    idle.start()
    time.sleep(3)
    idle.stop.set()
    idle.join()
    rows = []
    try:
        for n, files in ((n, files) for n in args.images for files in (False, True)):
            runs = [one_run(n, version, probe_image, media, files) for _ in range(args.repeats)]
            seconds = median([r["seconds"] for r in runs])
            cpu = median([r["cpu"] + r["db_cpu"] for r in runs])
            rows.append([f"{n:,}", f"{2 * n:,}" if files else "none", len(runs), f"{seconds:.1f}", f"{1e6 * seconds / n:.0f}", f"{cpu:.1f}",
                         f"{1e6 * cpu / n:.0f}", f"{max(r['load'] for r in runs):.1f}",
                         f"{1000 * median([r['search_p50'] for r in runs]):.1f}",
                         f"{1000 * max(r['search_max'] for r in runs):.0f}",
                         sum(r["searches"] for r in runs), sum(r["errors"] for r in runs)])
            print(rows[-1], flush=True)
    finally:
        Dataset.objects.filter(name="bench-delete-probe").delete()
        if version.pk and not version.is_active and version.name.startswith("tiny"):
            version.delete()
        shutil.rmtree(media, ignore_errors=True)
    print(f"batch size {settings.CBIR_DELETE_BATCH_SIZE}; search (1,000 rows indexed) before the runs: "
          f"median {1000 * median(idle.latencies):.1f} ms, p95 {1000 * percentile(idle.latencies, 95):.1f} ms "
          f"({len(idle.latencies)} queries)")
    print(table(["images", "files", "runs", "delete s (median)", "µs per image", "CPU s (process + its backend)",
                 "CPU µs per image", "load average (max)", "search median ms (during)",
                 "search max ms (during)", "searches", "search errors"], rows))


if __name__ == "__main__":
    main()
