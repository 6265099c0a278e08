"""A model version's HNSW indexes: the one owner of their names, indexed
expression, state and DDL, and their builds at scale.

One partial expression index per version, and one more for each of its large
datasets (`WHERE model_version_id = V AND dataset_id = D`: a filtered search
then walks a graph of its own rows only; search/indexing.py says which):
`CREATE INDEX CONCURRENTLY` when the caller is not inside a transaction, so
embedding writes to search_embedding go on during the build (PostgreSQL refuses
CONCURRENTLY inside a transaction block; there the plain statement is used).
`maintenance_work_mem` is sized from the rows so the graph is built in memory
(pgvector slows down many times once it no longer fits), and
`max_parallel_maintenance_workers` from the cores. A thread reads
`pg_stat_progress_create_index` for the building backend and reports it.

Measured figures behind the sizes: docs/scaling.md."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import Q
from django.db.models.functions import Cast
from pgvector.django import HalfVectorField, HnswIndex

from cbirsite import machine
from search.models import Dataset, Embedding
from training.models import ModelVersion

Progress = Callable[[int, int, str], None]
logger = logging.getLogger(__name__)

# Graph bytes per row in maintenance_work_mem, measured with pgvector 0.8.5's
# "hnsw graph no longer fits into maintenance_work_mem after N tuples" notice
# (halfvec, m = 16): 3,277 B at 1,280-d, 1,228 B at 256-d, i.e. 2 bytes per
# dimension plus 716 B, of which the layer-0 neighbour list is 2m x 16 B.
GRAPH_BYTES_PER_DIMENSION = 2
GRAPH_BYTES_PER_M = 32
GRAPH_BYTES_FIXED = 204
# Headroom over the estimate: the row count moves while a build waits.
GRAPH_HEADROOM = 1.2
MIN_BUILD_MEMORY = 64 * machine.MIB  # PostgreSQL's default maintenance_work_mem
# Without CBIR_INDEX_BUILD_MEMORY, a build takes at most this share of the machine's memory.
MAX_BUILD_MEMORY_SHARE = 0.25
_LOCK_BASE = 0x43_42_49_52 << 32  # "CBIR" in the high half of the advisory-lock key


class IndexBuildError(RuntimeError):
    """The index could not be built (the message says why)."""


def graph_bytes(rows: int, dimension: int, m: int) -> int:
    """Estimated size in bytes of pgvector's in-memory HNSW graph for `rows`
    halfvec vectors of `dimension` with `m` links per node."""
    per_row = GRAPH_BYTES_PER_DIMENSION * dimension + GRAPH_BYTES_PER_M * m + GRAPH_BYTES_FIXED
    return int(rows) * per_row


def build_memory(rows: int, dimension: int, m: int) -> int:
    """maintenance_work_mem in bytes for building an index of `rows` vectors:
    CBIR_INDEX_BUILD_MEMORY when set, else the graph estimate with 20 % headroom,
    at least 64 MB and at most a quarter of this machine's memory."""
    if settings.CBIR_INDEX_BUILD_MEMORY:
        return int(settings.CBIR_INDEX_BUILD_MEMORY)
    wanted = int(graph_bytes(rows, dimension, m) * GRAPH_HEADROOM)
    cap = max(MIN_BUILD_MEMORY, int(machine.memory_bytes() * MAX_BUILD_MEMORY_SHARE))
    return max(MIN_BUILD_MEMORY, min(wanted, cap))


def build_workers() -> int:
    """max_parallel_maintenance_workers for a build: CBIR_INDEX_BUILD_WORKERS
    when set (>= 0), else one per core beyond the first (the leader works too), at most 8."""
    if settings.CBIR_INDEX_BUILD_WORKERS >= 0:
        return int(settings.CBIR_INDEX_BUILD_WORKERS)
    return max(0, min(machine.cores() - 1, 8))


# --- Names, expression, state --------------------------------------------------

MISSING, VALID, INVALID, BUILDING = "missing", "valid", "invalid", "building"
INDEX_PREFIX = "search_embedding_hnsw_v"


def index_name(version: ModelVersion | int, dataset: Dataset | int | None = None) -> str:
    """The version's index ("search_embedding_hnsw_v7"), or its index of one
    dataset ("search_embedding_hnsw_v7_d3"); rows or their ids."""
    version_pk = version if isinstance(version, int) else int(version.pk)
    if dataset is None:
        return f"{INDEX_PREFIX}{version_pk}"
    return f"{INDEX_PREFIX}{version_pk}_d{dataset if isinstance(dataset, int) else int(dataset.pk)}"


def _name_pattern(version: ModelVersion | None, dataset_pk: int | None) -> str:
    """The regular expression of index_name's per-dataset names (either part a wildcard when None)."""
    return (rf"^{INDEX_PREFIX}{int(version.pk) if version else '[0-9]+'}"
            rf"_d{int(dataset_pk) if dataset_pk is not None else '[0-9]+'}$")


def dataset_of(name: str) -> int:
    """The dataset id in a per-dataset index name (index_name's inverse)."""
    return int(name.rsplit("_d", 1)[1])


def indexed_expression(version: ModelVersion) -> Cast:
    """The indexed expression: the stored vector cast to the version's
    halfvec(D) (HNSW indexes at most 2,000 dimensions of `vector`, 4,000 of
    `halfvec`). A search must order by this very expression for PostgreSQL to
    use the index (search/neighbours.py does)."""
    return Cast("vector", HalfVectorField(dimensions=int(version.dimension)))


def index_definition(version: ModelVersion, m: int, ef_construction: int,
                     dataset: Dataset | None = None) -> HnswIndex:
    """pgvector-python's HnswIndex for the version's partial cosine index
    (`WHERE model_version_id = V`, with `dataset` also `AND dataset_id = D`):
    its name, build parameters and condition (create_index_sql writes the statement)."""
    condition = Q(model_version_id=int(version.pk))
    if dataset is not None:
        condition &= Q(dataset_id=int(dataset.pk))
    return HnswIndex(indexed_expression(version), name=index_name(version, dataset), m=int(m),
                     ef_construction=int(ef_construction), condition=condition)


def index_state(version: ModelVersion | int, dataset: Dataset | None = None) -> str:
    """The state of the version's index or, with `dataset`, of its index of
    that dataset: "valid" (searches use it), "missing", "building" (a CREATE
    INDEX CONCURRENTLY is running on it: listed, not yet used), or "invalid"
    (left by a failed or interrupted concurrent build: PostgreSQL keeps it,
    unused by queries; the next build drops it). Search, the admin and
    evaluation all read this."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT i.indisvalid, EXISTS (SELECT 1 FROM pg_stat_progress_create_index p "
                       "WHERE p.index_relid = i.indexrelid) "
                       "FROM pg_index i WHERE i.indexrelid = to_regclass(%s)", [index_name(version, dataset)])
        row = cursor.fetchone()
    if row is None:
        return MISSING
    if row[0]:
        return VALID
    return BUILDING if row[1] else INVALID


STATE_WORDS = {VALID: "ready", MISSING: "no index", BUILDING: "index building",
               INVALID: "index invalid (a failed build; the next build replaces it)"}


def state_in_words(version: ModelVersion) -> str:
    """index_state for people (the admin's pages)."""
    return STATE_WORDS[index_state(version)]


def is_ready(version: ModelVersion) -> bool:
    """Whether searches can use the version's index (index_state is "valid")."""
    return index_state(version) == VALID


@contextmanager
def _build_lock(version: ModelVersion, *, in_transaction: bool, poll: float = 0.5) -> Iterator[None]:
    """One build per version at a time, across processes. The try-lock is polled
    rather than waited on: a waiting statement would hold a snapshot that a
    concurrent build's CONCURRENTLY phase waits for, a deadlock."""
    key = _LOCK_BASE + int(version.pk)
    function = "pg_try_advisory_xact_lock" if in_transaction else "pg_try_advisory_lock"
    with connection.cursor() as cursor:
        while True:
            cursor.execute(f"SELECT {function}(%s)", [key])
            if cursor.fetchone()[0]:
                break
            time.sleep(poll)
    try:
        yield
    finally:
        if not in_transaction:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [key])


# --- Progress -----------------------------------------------------------------

@dataclass(frozen=True)
class BuildProgress:
    """One row of pg_stat_progress_create_index: `phase` as PostgreSQL names it
    (e.g. "building index: loading tuples"), blocks of the table scanned and
    tuples loaded into the graph, each out of its total (0 when unknown)."""

    phase: str
    blocks_done: int
    blocks_total: int
    tuples_done: int
    tuples_total: int

    def as_progress(self, rows: int = 0, what: str = "the HNSW index") -> tuple[int, int, str]:
        """(done, total, message) for a job's progress bar. pgvector counts the
        tuples it loads but leaves tuples_total at 0, so `rows` (the rows the
        partial index will hold) is the total when given; else tuples_total
        when known, else the table's blocks. `what` names the index in the message."""
        if rows:
            done, total = min(self.tuples_done, rows), rows
        elif self.tuples_total:
            done, total = self.tuples_done, self.tuples_total
        else:
            done, total = self.blocks_done, self.blocks_total
        return done, total, (f"building {what}: {self.phase} ({self.tuples_done:,}/{total:,} rows, "
                             f"{self.blocks_done:,}/{self.blocks_total:,} blocks of the table)")


def read_progress(pid: int) -> BuildProgress | None:
    """The CREATE INDEX progress of backend `pid`, or None when it builds nothing."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT phase, blocks_done, blocks_total, tuples_done, tuples_total "
                       "FROM pg_stat_progress_create_index WHERE pid = %s", [int(pid)])
        row = cursor.fetchone()
    return None if row is None else BuildProgress(str(row[0]), *(int(v or 0) for v in row[1:]))


class _Poller(threading.Thread):
    """Reads the build's progress every `interval` seconds on its own database
    connection and hands each reading to `progress`."""

    def __init__(self, pid: int, progress: Progress, interval: float, rows: int, what: str) -> None:
        super().__init__(name=f"cbir-index-progress-{pid}", daemon=True)
        self.pid, self.progress, self.interval, self.rows, self.what = pid, progress, interval, rows, what
        self.stopped = threading.Event()
        self.samples: list[BuildProgress] = []

    def run(self) -> None:
        try:
            while not self.stopped.is_set():
                sample = read_progress(self.pid)
                if sample is not None:
                    self.samples.append(sample)
                    try:
                        self.progress(*sample.as_progress(self.rows, self.what))
                    except Exception:  # noqa: BLE001 - a lost progress write never stops the build
                        logger.warning("could not record index build progress", exc_info=True)
                self.stopped.wait(self.interval)
        finally:
            connection.close()  # this thread's own connection


# --- Build --------------------------------------------------------------------

@dataclass
class BuildReport:
    """What ensure_index did for the index `name`: created (False: a valid
    index was there), rows it holds, the maintenance_work_mem (bytes) and
    workers it used, whether it ran CONCURRENTLY, seconds, and the progress
    samples it read; `error`: why the build failed, when its caller carried on
    (search/indexing.build_hnsw_indexes, for a dataset's index)."""

    name: str = ""
    created: bool = False
    rows: int = 0
    memory: int = 0
    workers: int = 0
    concurrently: bool = False
    dropped_invalid: bool = False
    seconds: float = 0.0
    samples: list[BuildProgress] = field(default_factory=list)
    error: str = ""

    def describe(self) -> str:
        """One line for a job's log."""
        if self.error:
            return f"{self.name} not built: {self.error}"
        return (f"{self.name} built: {self.rows:,} rows in {self.seconds:.1f} s (maintenance_work_mem "
                f"{self.memory // 2**20} MB, {self.workers} parallel worker(s)"
                f"{', an invalid index from a failed build dropped first' if self.dropped_invalid else ''})")


def create_index_sql(version: ModelVersion, m: int, ef_construction: int, *,
                     concurrently: bool, dataset: Dataset | None = None) -> str:
    """The CREATE INDEX statement of index_definition, e.g.
    CREATE INDEX CONCURRENTLY "search_embedding_hnsw_v7" ON "search_embedding" USING hnsw
    ((("vector")::halfvec(1280)) halfvec_cosine_ops) WITH (m = 16, ef_construction = 128)
    WHERE "model_version_id" = 7.

    The expression and the condition are compiled by Django, the WITH clause is
    HnswIndex.get_with_params(); the statement itself is written here because
    Django 5.2's schema editor puts an operator class on an expression inside
    the element's parentheses (`((expr halfvec_cosine_ops))`, which PostgreSQL
    refuses), and HNSW on halfvec needs halfvec_cosine_ops."""
    from django.db.models.sql import Query

    index = index_definition(version, m, ef_construction, dataset)
    query = Query(Embedding, alias_cols=False)
    compiler = query.get_compiler(connection=connection)
    expression, params = compiler.compile(indexed_expression(version).resolve_expression(query))
    where = index._get_condition_sql(Embedding, connection.schema_editor(collect_sql=True))  # type: ignore[attr-defined]
    assert not params
    return (f'CREATE INDEX {"CONCURRENTLY " if concurrently else ""}{connection.ops.quote_name(index.name)} '
            f'ON "search_embedding" USING hnsw (({expression}) halfvec_cosine_ops) '
            f"WITH ({', '.join(index.get_with_params())}) WHERE {where}")


def ensure_index(version: ModelVersion, *, m: int, ef_construction: int,
                 progress: Progress | None = None, dataset: Dataset | None = None) -> BuildReport:
    """Build the version's HNSW index (with `dataset`: its index of that
    dataset's rows) unless a valid one exists; an INVALID one (a failed
    concurrent build) is dropped and built again.

    Outside a transaction the build is CONCURRENTLY (writes go on); inside one
    it is a plain CREATE INDEX. `progress(done, total, message)` is called from
    a thread every CBIR_INDEX_PROGRESS_INTERVAL seconds during the build.
    Raises IndexBuildError when PostgreSQL refuses the build."""
    in_transaction = connection.in_atomic_block
    name = index_name(version, dataset)
    report = BuildReport(name=name, concurrently=not in_transaction)
    with _build_lock(version, in_transaction=in_transaction):
        state = index_state(version, dataset)
        if state == VALID:
            return report
        with connection.cursor() as cursor:
            if state in (INVALID, BUILDING):  # BUILDING under our lock: a build whose session is ending
                cursor.execute(f"DROP INDEX {'' if in_transaction else 'CONCURRENTLY '}IF EXISTS {name}")
                report.dropped_invalid = True
            rows = Embedding.objects.filter(model_version=version)
            report.rows = (rows if dataset is None else rows.filter(dataset=dataset)).count()
            report.memory = build_memory(report.rows, int(version.dimension), m)
            report.workers = build_workers()
            scope = "LOCAL " if in_transaction else ""
            cursor.execute(f"SET {scope}maintenance_work_mem = '{report.memory // 1024}kB'")
            cursor.execute(f"SET {scope}max_parallel_maintenance_workers = {int(report.workers)}")
            if in_transaction:
                # Django's foreign keys are deferred; PostgreSQL refuses CREATE
                # INDEX on a table with pending checks, so run them now.
                cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
            cursor.execute("SELECT pg_backend_pid()")
            pid = int(cursor.fetchone()[0])
            what = "the HNSW index" if dataset is None else f"the HNSW index of dataset {dataset.name!r}"
            poller = (_Poller(pid, progress, settings.CBIR_INDEX_PROGRESS_INTERVAL, report.rows, what)
                      if progress else None)
            start = time.perf_counter()
            try:
                if poller:
                    poller.start()
                cursor.execute(create_index_sql(version, m, ef_construction, concurrently=not in_transaction,
                                                dataset=dataset))
            except Exception as exc:
                raise IndexBuildError(f"building {name} failed: {exc}") from exc
            finally:
                if poller:
                    poller.stopped.set()
                    poller.join()
                    report.samples = poller.samples
                if not in_transaction:
                    cursor.execute("RESET maintenance_work_mem")
                    cursor.execute("RESET max_parallel_maintenance_workers")
            report.seconds = time.perf_counter() - start
    report.created = True
    return report


def dataset_indexes(*, version: ModelVersion | None = None, dataset: Dataset | int | None = None) -> list[str]:
    """Names of the per-dataset indexes (valid or not) of `version`, of
    `dataset` (a Dataset or its id), or of both, read from the catalogue."""
    dataset_pk = dataset.pk if isinstance(dataset, Dataset) else dataset
    pattern = _name_pattern(version, dataset_pk)
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'search_embedding' "
                       "AND indexname ~ %s ORDER BY indexname", [pattern])
        return [row[0] for row in cursor.fetchall()]


def drop_index(version: ModelVersion) -> None:
    """Drop the version's index and its per-dataset indexes (valid or not);
    nothing when there are none."""
    with connection.cursor() as cursor:
        for name in [index_name(version), *dataset_indexes(version=version)]:
            cursor.execute(f"DROP INDEX IF EXISTS {name}")


DROP_LOCK_TIMEOUT = "5s"


def _drop_without_blocking(names: list[str]) -> list[str]:
    """Drop these indexes; returns the names dropped. Outside a transaction
    each is dropped CONCURRENTLY, so searches and writes go on, waiting at
    most DROP_LOCK_TIMEOUT (an index build running on the table holds the lock
    CONCURRENTLY needs for as long as it runs): one not dropped in time is
    logged and left for drop_orphan_indexes. Inside a transaction: a plain
    DROP INDEX."""
    from django.db.utils import OperationalError

    dropped = []
    in_transaction = connection.in_atomic_block
    with connection.cursor() as cursor:
        if not in_transaction:
            cursor.execute(f"SET lock_timeout = '{DROP_LOCK_TIMEOUT}'")
        try:
            for name in names:
                try:
                    cursor.execute(f"DROP INDEX {'' if in_transaction else 'CONCURRENTLY '}IF EXISTS {name}")
                    dropped.append(name)
                except OperationalError as exc:  # the lock timeout
                    if in_transaction:
                        raise
                    logger.warning("%s not dropped now (%s); the version's next index build drops it", name, exc)
        finally:
            if not in_transaction:
                cursor.execute("RESET lock_timeout")
    return dropped


def drop_dataset_indexes(dataset: Dataset | int) -> list[str]:
    """Drop every version's index of `dataset` (a Dataset or the id of a
    deleted one; search/signals.py calls it once the delete has committed),
    without blocking searches (_drop_without_blocking); returns the names dropped."""
    return _drop_without_blocking(dataset_indexes(dataset=dataset))


def drop_orphan_indexes(version: ModelVersion) -> list[str]:
    """Drop the version's per-dataset indexes whose dataset no longer exists
    (one deleted while its index was being built, or whose drop timed out),
    without blocking searches; returns their names."""
    names = {name: dataset_of(name) for name in dataset_indexes(version=version)}
    alive = set(Dataset.objects.filter(pk__in=list(names.values())).values_list("pk", flat=True))
    return _drop_without_blocking([name for name, pk in names.items() if pk not in alive])


def sizes(version: ModelVersion) -> dict[str, Any]:
    """Bytes on disk: the version's index, and the whole search_embedding table
    (heap + TOAST, where 1,280-d halfvec rows live: they exceed 2 kB)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT coalesce(pg_relation_size(to_regclass(%s)), 0), "
                       "pg_table_size('search_embedding'), pg_indexes_size('search_embedding')",
                       [index_name(version)])
        index, table, indexes = cursor.fetchone()
    return {"index_bytes": int(index), "table_bytes": int(table), "all_indexes_bytes": int(indexes)}
