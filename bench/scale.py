"""A million images on one machine: load, index build and search at N rows.

    .venv/bin/python bench/scale.py --n 100000 [--dim 1280] [--clusters 256] [--like VERSION] [--queries 60]
        [--k 10] [--ef-search 40,100,200,400] [--compare-queries 20] [--reuse] [--keep] [--unfiltered-only]
        [--lid-only] [--json]

Loads N unit vectors into the project's own tables. Two kinds of data:

  clustered (default)  `--clusters` isotropic Gaussian clusters on the sphere,
                       each point at cosine ~0.7 from its centre;
  --like VERSION       shaped like a stored model version's real embeddings:
                       one Gaussian per label with that label's mean and
                       covariance (its SVD), sampled, then L2-normalised. No
                       stored vector is copied; only first and second moments
                       are kept.

How hard a set is for nearest-neighbour search is measured by its local
intrinsic dimensionality (LID: the maximum-likelihood estimate of Levina &
Bickel 2004, as Amsaleg et al., KDD 2015, use it, over each query's 100
nearest rows; Aumüller & Ceccarello 2019 show ANN recall falls as LID rises),
printed for every run (--lid-only: only that, nothing written). Measured
at 55,887 rows (docs/scaling.md): the real EfficientNet-Lite0 embeddings of
Fashion-MNIST have a median LID of 18.2, their per-label Gaussian fit 33.9,
the isotropic clusters 77.9: both synthetic sets are harder than the real
embeddings, the clusters far harder.

The vectors go in through the project's own code: images with bulk_create, embeddings with
search.indexing.copy_embeddings (binary COPY), under a scratch model version
"bench-scale-<dim>" of the tiny network made by training/versions.py. The
images are split into datasets holding 0.01 %, 0.1 %, 1 % and 10 % of the
rows and the rest (88.89 %), so a dataset filter has those selectivities.

Then builds the version's HNSW indexes through the code path jobs use
(search.indexing.build_hnsw_indexes: CONCURRENTLY, memory sized from the
rows, progress read from pg_stat_progress_create_index; the version's index,
then one per dataset of more than CBIR_EXACT_SEARCH_MAX_ROWS rows and at most
CBIR_DATASET_INDEX_MAX_SHARE of them; then the search calibration of
search/calibration.py, timed apart from the builds) and queries them with
`--queries` fresh points drawn like the rows (not stored), against numpy's exact top k
over the same halfvec-rounded vectors:

  unfiltered       p50/p95 latency and recall@k for each ef_search of --ef-search,
                   then at the version's calibrated ef_search (the default
                   searches use, unless CBIR_HNSW_EF_SEARCH is set)
  filtered         at the calibrated ef_search, for each dataset: the plan
                   search.neighbours chooses, and
                   both plans forced ("exact", "hnsw") on --compare-queries
                   queries: the crossover between them. "hnsw" walks the
                   dataset's own index where it has one, else the version's
                   ("plan" names the index, read from EXPLAIN)

Latency is the wall time of search.neighbours.nearest's work (plan choice,
statement, rows) in milliseconds. Prints load time, build time and rows/s,
table and index bytes per row and per million rows. The machine may be
shared: the report says how busy it was, but its "other processes" include
the PostgreSQL backends doing this benchmark's build and queries, so here a
high figure is partly the benchmark itself. --reuse keeps rows from an earlier
run with the same N/dim/seed (only the index is rebuilt); --keep leaves the
scratch data in place afterwards (default: deleted).
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import numpy as np
from _common import OtherLoad, busy_warning, emit, median, percentile, setup_django, table

SHARES = [("sel-0.01%", 0.0001), ("sel-0.1%", 0.001), ("sel-1%", 0.01), ("sel-10%", 0.1)]
SEED = 20261129


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="rows (default 20,000)")
    parser.add_argument("--dim", type=int, default=1280, help="dimension (default 1280, EfficientNet-Lite0's)")
    parser.add_argument("--clusters", type=int, default=256, help="Gaussian clusters (default 256)")
    parser.add_argument("--like", default=None, metavar="VERSION",
                        help="draw the vectors from a per-label Gaussian fit of this model version's stored "
                             "embeddings instead of isotropic clusters (--dim becomes the version's)")
    parser.add_argument("--queries", type=int, default=60, help="queries per case (default 60)")
    parser.add_argument("--compare-queries", type=int, default=20, help="queries per forced plan (default 20)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--ef-search", default="40,100,200,400", help="hnsw.ef_search values for the curve")
    parser.add_argument("--reuse", action="store_true", help="keep loaded rows of an earlier run; rebuild the index")
    parser.add_argument("--keep", action="store_true", help="leave the scratch data in the database")
    parser.add_argument("--unfiltered-only", action="store_true",
                        help="skip the filtered cases (for tuning m and ef_construction with --reuse)")
    parser.add_argument("--lid-only", action="store_true",
                        help="only make the data and print the queries' LID (and, with --like, the real "
                             "embeddings'): nothing is written to the database")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def clustered_vectors(n: int, dim: int, clusters: int, rng: np.random.Generator,
                      chunk: int = 50_000) -> np.ndarray:
    """(n, dim) float32 unit vectors around `clusters` random unit centres,
    made `chunk` rows at a time in float32 so that 1M x 1,280-d needs its
    5.1 GB and not three times that in temporaries."""
    centres = rng.standard_normal(size=(clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    points = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        block = points[lo:hi]
        rng.standard_normal(size=block.shape, dtype=np.float32, out=block)
        block /= np.float32(np.sqrt(dim))
        block += centres[rng.integers(0, clusters, size=hi - lo)]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return points


def stored_vectors(version_name: str) -> tuple[np.ndarray, list[str], list[str]]:
    """(vectors (M, D) float32, L2-normalised; label of each, "" when none;
    split of each) of a stored model version's embeddings. Raises SystemExit
    when the version is unknown or has no embedding."""
    from search.models import Embedding
    from training.models import ModelVersion

    version = ModelVersion.objects.filter(name=version_name).first()
    if version is None:
        raise SystemExit(f"--like: no model version named {version_name!r}")
    vectors, labels, splits = [], [], []
    rows = (Embedding.objects.filter(model_version=version).order_by("pk")
            .values_list("vector", "image__label", "image__split"))
    for vector, label, split in rows.iterator(chunk_size=5000):
        vectors.append(np.asarray(vector, dtype=np.float32))
        labels.append(label or "")
        splits.append(split)
    if not vectors:
        raise SystemExit(f"--like: {version_name} has no embeddings")
    x = np.stack(vectors)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels, splits


def fit_per_label(vectors: np.ndarray, labels: list[str]) -> list[tuple[str, int, np.ndarray, np.ndarray, np.ndarray]]:
    """(label, rows, mean (D,), singular values / sqrt(rows) (r,), right
    singular vectors (r, D)) for each label of `vectors` (stored_vectors'),
    all float32; unlabelled rows form one group, and a group of one row is
    left out. Raises SystemExit when no group is left."""
    groups: dict[str, list[int]] = {}
    for row, label in enumerate(labels):
        groups.setdefault(label, []).append(row)
    groups = {label: rows for label, rows in groups.items() if len(rows) >= 2}
    if not groups:
        raise SystemExit("--like: no label with 2 or more embeddings to fit")
    fits = []
    for label, rows in sorted(groups.items()):
        x = vectors[rows]
        mean = x.mean(axis=0)
        _, singular, basis = np.linalg.svd(x - mean, full_matrices=False)
        fits.append((label, len(x), mean, (singular / np.sqrt(len(x))).astype(np.float32), basis.astype(np.float32)))
    return fits


def real_lid(vectors: np.ndarray, splits: list[str], queries: int = 500) -> tuple[float, int]:
    """(median LID@100, rows searched) of a stored version's own embeddings:
    up to `queries` test-split rows (spread over the split; the last rows when
    there is no test split) as queries against every row outside the test
    split (every other row when there is none). Raises SystemExit when fewer
    than 101 rows would be searched."""
    is_test = np.array([split == "test" for split in splits])
    if is_test.any():
        pool, base = np.flatnonzero(is_test), ~is_test
    else:
        pool = np.arange(max(0, len(vectors) - queries), len(vectors))
        base = np.ones(len(vectors), dtype=bool)
        base[pool] = False
    if base.sum() <= 100 or len(pool) == 0:
        raise SystemExit(f"--like: the real embeddings' LID needs test rows and over 100 others; there are "
                         f"{len(pool)} and {int(base.sum())}")
    chosen = pool[np.linspace(0, len(pool) - 1, min(queries, len(pool))).astype(int)]
    return local_intrinsic_dimension(vectors[chosen] @ vectors[base].T), int(base.sum())


def fitted_vectors(n: int, fits, rng: np.random.Generator, chunk: int = 50_000) -> np.ndarray:
    """(n, D) float32 unit vectors from fit_per_label's Gaussians: a label in
    proportion to its rows, then mean + N(0, covariance) through the SVD,
    L2-normalised; `chunk` rows at a time."""
    weights = np.array([f[1] for f in fits], dtype=np.float64)
    owner = rng.choice(len(fits), size=n, p=weights / weights.sum())
    points = np.empty((n, len(fits[0][2])), dtype=np.float32)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        for i, (_, _, mean, scale, basis) in enumerate(fits):
            rows = lo + np.flatnonzero(owner[lo:hi] == i)
            if len(rows):
                coefficients = rng.standard_normal(size=(len(rows), len(scale)), dtype=np.float32) * scale
                points[rows] = mean + coefficients @ basis
        block = points[lo:hi]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return points


def local_intrinsic_dimension(scores: np.ndarray, k: int = 100) -> float:
    """Median over queries of the maximum-likelihood LID from each query's k
    nearest rows: -(k - 1) / sum_i log(d_i / d_k) over i < k (Levina & Bickel,
    NIPS 2004; the estimator Amsaleg et al., KDD 2015, study for LID). `scores`
    is a (queries, N) block of cosine similarities (exact_scores'); distances
    are Euclidean between unit vectors, sqrt(2 - 2 cos). The queries must not
    be among the N rows. Rows at distance 0 (copies of the query) carry no
    information on dimension and are left out of that query's sum; a query
    whose k-th neighbour is a copy is left out."""
    k = min(k, scores.shape[1])
    top = -np.sort(-np.partition(scores, -k, axis=1)[:, -k:], axis=1)
    distances = np.sqrt(np.maximum(2 - 2 * top.astype(np.float64), 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(distances[:, :-1] / distances[:, -1:])  # -inf for a copy, nan when d_k is 0
        logs[~np.isfinite(logs)] = np.nan
        estimates = -np.sum(~np.isnan(logs), axis=1) / np.nansum(logs, axis=1)
    return float(np.nanmedian(np.where(np.isfinite(estimates), estimates, np.nan)))


def round_to_halfvec_(vectors: np.ndarray, chunk: int = 50_000) -> np.ndarray:
    """The stored halfvec values, as PostgreSQL compares them: round each row to
    float16 and renormalise, in place, `chunk` rows at a time (no 5 GB copy at 1M)."""
    for lo in range(0, len(vectors), chunk):
        block = vectors[lo:lo + chunk]
        block[:] = block.astype(np.float16)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return vectors


def exact_scores(vectors16: np.ndarray, queries: np.ndarray, chunk: int = 100_000) -> np.ndarray:
    """(queries, N) float32 cosine similarities of each (halfvec-rounded) query
    to every stored row, `chunk` rows at a time: one pass over the vectors
    serves the unfiltered truth and every dataset's."""
    q = queries.astype(np.float16).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores = np.empty((len(q), len(vectors16)), dtype=np.float32)
    for lo in range(0, len(vectors16), chunk):
        scores[:, lo:lo + chunk] = q @ vectors16[lo:lo + chunk].T
    return scores


def data_label(args) -> str:
    """What the rows are, for reports and the scratch version's notes."""
    return f"like {args.like}" if args.like else f"{args.clusters} clusters"


def real_fields(args) -> dict:
    """The real embeddings' LID (set by data() with --like) for a report; {} without --like."""
    return {"like": args.like, "real_lid": round(args.real_lid[0], 1), "real_rows": args.real_lid[1]} \
        if args.like else {}


def data(args) -> tuple[np.ndarray, np.ndarray]:
    """(the N stored vectors, the query vectors), the same for the same arguments."""
    rng = np.random.default_rng(SEED)
    if args.like:
        vectors, labels, splits = stored_vectors(args.like)
        fits = fit_per_label(vectors, labels)
        args.real_lid = real_lid(vectors, splits)
        args.like_rows = len(vectors)
        args.dim = len(fits[0][2])
        both = fitted_vectors(args.n + 2 * args.queries, fits, rng)
    else:
        both = clustered_vectors(args.n + 2 * args.queries, args.dim, args.clusters, rng)
    return both[:args.n], both[args.n:]


def dataset_sizes(n: int) -> list[tuple[str, int]]:
    sizes = [(name, max(1, round(n * share))) for name, share in SHARES]
    return sizes + [("rest", n - sum(size for _, size in sizes))]


def scratch(args):
    from search.models import Dataset
    from training.models import ModelVersion
    from training.versions import get_or_create_version

    name = f"bench-scale-{args.dim}"
    version = ModelVersion.objects.filter(name=name).first()
    if version is not None and version.is_active:
        raise SystemExit(f"{name} is the active model version; activate another before benchmarking")
    datasets = {label: f"bench-scale-{label}" for label, _ in dataset_sizes(args.n)}
    expected = sum(size for _, size in dataset_sizes(args.n))
    rows = f" ({args.like_rows} rows)" if args.like else ""
    kind = f"bench/scale.py data: {data_label(args)}{rows}, seed {SEED}"  # --reuse only reuses rows made the same way
    if args.reuse and version is not None and version.notes == kind and version.embeddings.count() == expected and all(
            Dataset.objects.filter(name=d).exists() for d in datasets.values()):
        return version, {label: Dataset.objects.get(name=d) for label, d in datasets.items()}, False
    drop_scratch(version)
    version = get_or_create_version("tiny", random_weights=True, config={"dimension": args.dim, "size": 32},
                                    name=name)
    version.notes = kind
    version.save(update_fields=["notes"])
    return version, {label: Dataset.objects.create(name=d, description="bench/scale.py scratch data; safe to delete")
                     for label, d in datasets.items()}, True


def drop_scratch(version) -> None:
    """Delete the scratch version, its rows and the scratch datasets in SQL:
    the ORM's cascade would load every image and run the file clean-up signal
    (two queries per image), and these placeholder rows have no files."""
    from django.db import connection

    from search.models import Dataset

    with connection.cursor() as cursor:
        if version is not None:
            cursor.execute("DELETE FROM search_embedding WHERE model_version_id = %s", [version.pk])
        cursor.execute("DELETE FROM search_embedding WHERE image_id IN (SELECT i.id FROM search_image i "
                       "JOIN search_dataset d ON d.id = i.dataset_id WHERE d.name LIKE %s)", ["bench-scale-%"])
        cursor.execute("DELETE FROM search_image WHERE dataset_id IN "
                       "(SELECT id FROM search_dataset WHERE name LIKE %s)", ["bench-scale-%"])
    if version is not None:
        version.delete()  # drops its index
    Dataset.objects.filter(name__startswith="bench-scale-").delete()


def load(version, datasets, vectors, args) -> dict:
    from django.db import connection

    from search.indexing import copy_embeddings
    from search.models import Image

    sizes = dataset_sizes(args.n)
    owner = np.concatenate([np.full(size, i) for i, (_, size) in enumerate(sizes)])
    np.random.default_rng(SEED + 1).shuffle(owner)  # datasets spread over the clusters
    start = time.perf_counter()
    ids = np.zeros(args.n, dtype=np.int64)
    for i, (label, _) in enumerate(sizes):
        members = np.flatnonzero(owner == i)
        for rows in np.array_split(members, max(1, len(members) // 20_000)):  # 20k Image objects at a time
            made = Image.objects.bulk_create([
                Image(dataset=datasets[label], file=f"bench/{r}.png", thumbnail=f"bench/{r}.jpg",
                      sha256=f"{r:064x}", split="train", width=1, height=1, original_filename=str(r))
                for r in rows], batch_size=5000)
            ids[rows] = [im.pk for im in made]
    images_seconds = time.perf_counter() - start
    start = time.perf_counter()
    step = 10_000
    for lo in range(0, args.n, step):
        copy_embeddings(version, ids[lo:lo + step], vectors[lo:lo + step])
    copy_seconds = time.perf_counter() - start
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE search_embedding")
        cursor.execute("ANALYZE search_image")
    return {"images_seconds": round(images_seconds, 1), "embeddings_seconds": round(copy_seconds, 1),
            "embeddings_rows_per_s": round(args.n / copy_seconds)}


def image_ids(version, args) -> np.ndarray:
    """Image id of each stored vector row (original_filename holds the row number)."""
    from search.models import Embedding

    rows = Embedding.objects.filter(model_version=version).values_list("image__original_filename", "image_id")
    ids = np.zeros(args.n, dtype=np.int64)
    for row, image_id in rows.iterator(chunk_size=20_000):
        ids[int(row)] = image_id
    return ids


def build(version) -> dict:
    """The version's index (its figures are the build rate) and then each
    dataset's own index, through build_hnsw_indexes; sizes in bytes."""
    from django.db import connection

    from search.hnsw import drop_index, sizes
    from search.indexing import build_hnsw_indexes
    from search.neighbours import CALIBRATION

    drop_index(version)  # and the datasets' indexes
    if (version.metrics or {}).pop(CALIBRATION, None) is not None:  # an earlier run's
        version.save(update_fields=["metrics"])
    start = time.perf_counter()
    reports = build_hnsw_indexes(version, progress=lambda done, total, message: None)
    seconds = time.perf_counter() - start
    report = reports[0]
    size = sizes(version)
    last = report.samples[-1] if report.samples else None
    own = []
    with connection.cursor() as cursor:
        for r in reports[1:]:
            cursor.execute("SELECT coalesce(pg_relation_size(to_regclass(%s)), 0)", [r.name])
            own.append({"name": r.name, "rows": r.rows, "seconds": round(r.seconds, 1), "error": r.error,
                        "index_bytes": int(cursor.fetchone()[0])})
    version.refresh_from_db()
    calibrated = (version.metrics or {}).get(CALIBRATION)
    if calibrated:  # measured inside build_hnsw_indexes, after the indexes: not part of their build time
        seconds -= calibrated["seconds"]
    return {"rows": report.rows, "seconds": round(report.seconds, 1), "rows_per_s": round(report.rows / report.seconds),
            "all_seconds": round(seconds, 1), "calibration": calibrated,
            "maintenance_work_mem_mb": report.memory // 2**20,
            "workers": report.workers, "concurrently": report.concurrently,
            "progress_samples": len(report.samples), "last_phase": last.phase if last else None,
            "dataset_indexes": own, **size}


def exact_top(scores: np.ndarray, ids: np.ndarray, rows: np.ndarray | None, k: int) -> list[int]:
    """Image ids of the k best rows for one query's row of exact_scores, among
    `rows` (None: all), ties broken by row order."""
    pool = scores if rows is None else scores[rows]
    pool_ids = ids if rows is None else ids[rows]
    top = np.argpartition(-pool, min(k, len(pool) - 1))[:k] if len(pool) > k else np.arange(len(pool))
    top = top[np.lexsort((top, -pool[top]))]
    return [int(pool_ids[i]) for i in top]


def measure(version, queries, truth, k, **query) -> dict:
    from search.neighbours import ef_search_for, fetch, neighbours_queryset

    latencies, recalls, counts = [], [], []
    for q, expected in zip(queries, truth):
        start = time.perf_counter()
        # The version's calibrated breadth, unless CBIR_HNSW_EF_SEARCH is set (the curve below sets it).
        hits, _ = fetch(neighbours_queryset(version, vector=q, **query), k, ef_search=ef_search_for(k, version))
        latencies.append(1000 * (time.perf_counter() - start))
        got = [h.image_id for h in hits]
        counts.append(len(got))
        recalls.append(len(set(got) & set(expected)) / max(1, min(k, len(expected))))
    return {"queries": len(latencies), "p50_ms": round(median(latencies), 2),
            "p95_ms": round(percentile(latencies, 95), 2), "recall": round(float(np.mean(recalls)), 3),
            "min_rows": min(counts)}


def search(version, datasets, vectors, ids, queries, args) -> dict:
    from django.conf import settings
    from django.test import override_settings

    from search.hnsw import index_name
    from search.neighbours import CALIBRATION, ef_search_for, explain, neighbours_queryset, plan_for

    vectors16 = round_to_halfvec_(vectors)  # in place: the float32 originals are not needed after the load
    k = args.k
    warm, timed = queries[:args.queries], queries[args.queries:]
    scores = exact_scores(vectors16, np.concatenate([warm[:5], timed]))
    warm_scores, scores = scores[:5], scores[5:]
    lid = round(local_intrinsic_dimension(scores), 1)
    measure(version, warm[:5], [exact_top(s, ids, None, k) for s in warm_scores], k)  # warm the cache
    truth = [exact_top(s, ids, None, k) for s in scores]
    curve = []
    for ef in [int(x) for x in args.ef_search.split(",")]:
        with override_settings(CBIR_HNSW_EF_SEARCH=ef):
            curve.append({"ef_search": max(ef, 2 * k), **measure(version, timed, truth, k)})
    if settings.CBIR_HNSW_EF_SEARCH is None and CALIBRATION in (version.metrics or {}):
        curve.append({"ef_search": f"{ef_search_for(k, version)} (calibrated)", **measure(version, timed, truth, k)})
    if args.unfiltered_only:
        return {"lid": lid, "unfiltered": curve, "filtered": []}
    sizes = dict(dataset_sizes(args.n))
    image_dataset = _owner_of(ids, datasets)
    filtered = []
    for label, dataset in datasets.items():
        rows = np.flatnonzero(image_dataset == dataset.pk)
        dtruth = [exact_top(s, ids, rows, k) for s in scores]
        plan = plan_for(version, dataset)
        if plan == "hnsw":  # which index the planner walks, read from its plan
            used = re.search(r"Index Scan using (\S+)", explain(neighbours_queryset(version, vector=timed[0],
                                                                                     dataset=dataset), k))
            plan = ("hnsw, own index" if used and used.group(1) == index_name(version, dataset) else
                    f"hnsw, {used.group(1) if used else 'no index'}")
        entry = {"dataset": label, "rows": sizes[label], "selectivity_pct": round(100 * sizes[label] / args.n, 3),
                 "plan": plan, "chosen": measure(version, timed, dtruth, k, dataset=dataset)}
        c = args.compare_queries
        for plan in ("exact", "hnsw"):
            entry[plan] = measure(version, timed[:c], dtruth[:c], k, dataset=dataset, plan=plan)
        filtered.append(entry)
    return {"lid": lid, "unfiltered": curve, "filtered": filtered}


def _owner_of(ids: np.ndarray, datasets) -> np.ndarray:
    from search.models import Image

    owner = dict(Image.objects.filter(dataset__in=list(datasets.values())).values_list("pk", "dataset_id"))
    return np.array([owner[int(i)] for i in ids])


def run(args) -> dict:
    from django.conf import settings

    load_meter = OtherLoad()
    started = time.perf_counter()
    vectors, queries = data(args)
    version, datasets, fresh = scratch(args)
    report: dict = {"n": args.n, "dim": args.dim, "data": data_label(args), "k": args.k,
                    "queries": args.queries, "m": settings.CBIR_HNSW_M,
                    "ef_construction": settings.CBIR_HNSW_EF_CONSTRUCTION,
                    "max_scan_tuples": settings.CBIR_HNSW_MAX_SCAN_TUPLES,
                    "exact_search_max_rows": settings.CBIR_EXACT_SEARCH_MAX_ROWS,
                    "dataset_index_max_share": settings.CBIR_DATASET_INDEX_MAX_SHARE}
    report.update(real_fields(args))
    report["load"] = load(version, datasets, vectors, args) if fresh else {"reused": True}
    ids = image_ids(version, args)
    report["build"] = build(version)
    b = report["build"]
    report["bytes_per_row"] = {"index": round(b["index_bytes"] / args.n), "table": round(b["table_bytes"] / args.n)}
    report["search"] = search(version, datasets, vectors, ids, queries, args)
    if not args.keep:
        drop_scratch(version)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["machine_load"] = load_meter.cores()
    return report


def print_report(r: dict) -> None:
    print(f"N = {r['n']:,} unit vectors, {r['dim']}-d, {r['data']} (median LID@100 of the queries "
          f"{r['search']['lid']}); k = {r['k']}, {r['queries']} queries; m = {r['m']}, "
          f"ef_construction = {r['ef_construction']}")
    if "real_lid" in r:
        print(f"(the real embeddings of {r['like']}: median LID@100 {r['real_lid']}, test-split queries against "
              f"{r['real_rows']:,} other rows)")
    load = r["load"]
    if load.get("reused"):
        print("load: reused rows from an earlier run")
    else:
        print(f"load: images {load['images_seconds']} s (bulk_create), embeddings {load['embeddings_seconds']} s "
              f"(binary COPY, {load['embeddings_rows_per_s']:,} rows/s)")
    b = r["build"]
    mb = 2**20
    print(f"build: {b['rows']:,} rows in {b['seconds']} s = {b['rows_per_s']:,} rows/s "
          f"(maintenance_work_mem {b['maintenance_work_mem_mb']} MB, {b['workers']} parallel worker(s), "
          f"CONCURRENTLY={b['concurrently']}, {b['progress_samples']} progress readings, last: {b['last_phase']})")
    for own in b["dataset_indexes"]:
        print(f"  then {own['name']}: {own['rows']:,} rows in {own['seconds']} s, {own['index_bytes'] / 2**20:.1f} MiB"
              + (f" NOT BUILT: {own['error']}" if own["error"] else ""))
    if b["dataset_indexes"]:
        print(f"  all indexes: {b['all_seconds']} s")
    cal = b.get("calibration")
    if cal:
        curve = ", ".join(f"{ef}: {recall} (≥ {cal['lower_bound'][ef]})" for ef, recall in cal["recall"].items())
        print(f"  then the search calibrated: ef_search {cal['ef_search']} in {cal['seconds']} s, {cal['queries']} "
              f"held-out queries, target {cal['target_recall']}; recall@{cal['k']} (95 % lower bound): {curve}")
    per = r["bytes_per_row"]
    print(f"sizes: index {b['index_bytes'] / mb:.1f} MiB = {per['index']:,} B/row = "
          f"{per['index'] * 1e6 / 2**30:.2f} GiB per million rows; table (heap+TOAST, whole search_embedding) "
          f"{b['table_bytes'] / mb:.1f} MiB = {per['table']:,} B/row = {per['table'] * 1e6 / 2**30:.2f} GiB "
          "per million rows")
    print()
    print("unfiltered (HNSW):")
    print(table(["ef_search", "p50 ms", "p95 ms", f"recall@{r['k']}"],
                [[c["ef_search"], c["p50_ms"], c["p95_ms"], c["recall"]] for c in r["search"]["unfiltered"]]))
    print()
    if not r["search"]["filtered"]:
        print(f"\n{r['seconds']} s in all; machine load: {r['machine_load']}")
        return
    print(f"filtered to one dataset (CBIR_EXACT_SEARCH_MAX_ROWS={r['exact_search_max_rows']}, "
          f"CBIR_DATASET_INDEX_MAX_SHARE={r['dataset_index_max_share']}, "
          f"hnsw.max_scan_tuples={r['max_scan_tuples']}):")
    rows = []
    for f in r["search"]["filtered"]:
        c, e, h = f["chosen"], f["exact"], f["hnsw"]
        rows.append([f["dataset"], f"{f['rows']:,}", f["selectivity_pct"], f["plan"],
                     f"{c['p50_ms']}/{c['p95_ms']}", c["recall"], c["min_rows"],
                     f"{e['p50_ms']}/{e['p95_ms']}", e["recall"], f"{h['p50_ms']}/{h['p95_ms']}", h["recall"],
                     h["min_rows"]])
    print(table(["dataset", "rows", "%", "plan", "chosen p50/p95 ms", "recall", "min rows",
                 "exact p50/p95", "recall", "hnsw p50/p95", "recall", "min rows"], rows))
    print(f"\n{r['seconds']} s in all; machine load: {r['machine_load']}")
    warning = busy_warning(r["machine_load"])
    if warning:
        print("WARNING:", warning)


def lid_only(args) -> dict:
    """The data's hardness without the database: the queries' LID against the
    N generated rows (float32, not rounded to halfvec), and with --like the
    real embeddings' own."""
    vectors, queries = data(args)
    return {"n": args.n, "data": data_label(args),
            "lid": round(local_intrinsic_dimension(exact_scores(vectors, queries[args.queries:])), 1),
            **real_fields(args)}


def print_lid(r: dict) -> None:
    print(f"N = {r['n']:,} rows, {r['data']}: median LID@100 of the queries {r['lid']}")
    if "real_lid" in r:
        print(f"the real embeddings: median LID@100 {r['real_lid']} (test-split queries against "
              f"{r['real_rows']:,} other rows)")


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_django()
    if args.lid_only:
        return emit(lid_only(args), args.json, print_lid)
    return emit(run(args), args.json, print_report)


if __name__ == "__main__":
    sys.exit(main())
