"""Search latency per stage, and for the whole request.

    .venv/bin/python bench/search_latency.py [--dataset animals] [--queries 50] [--warmup 5] [--k 10]
        [--filter-dataset] [--threads N] [--json]

Query images are the dataset's own files (bytes read up front, cycled through),
sent as an upload would be. For each query the stages of search_by_upload are
timed one by one, then the same bytes go through the test client's
POST /search/ for the end-to-end figure:

  decode+preprocess  search.imaging.decode_image (same draft_size as the
                     service) and the version's preprocessing to a tensor
  forward            training.core.inference.embed_batch on that tensor
  sql                search.services.nearest with the active version
  preview            the view's query thumbnail (a JPEG of the decoded upload);
                     the results page pays it on every request
  render             render_to_string("search/results.html") with the
                     context search.views.search_page gives
  end-to-end         django.test.Client POST /search/ (multipart parse,
                     middleware, all of the above)

Medians and p95 in milliseconds; the machine may be shared, so compare
medians and ratios, never single timings. The report says how much CPU other
processes used meanwhile and warns when it was enough to spoil the figures.

Also prints EXPLAIN ANALYZE of one query with the same per-transaction HNSW
options as nearest(), and says whether the version's HNSW index is used. On
a table of a few hundred rows the planner rightly prefers an exact scan plus
a top-N sort; the script then also prints the plan with sorting disabled, to
show the index is usable for the statement.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from _common import OtherLoad, busy_warning, emit, machine_info, median, percentile, setup_django, table

from search import hnsw

STAGES = ["decode+preprocess", "forward", "sql", "preview", "render"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="animals", help="dataset whose files are the queries")
    parser.add_argument("--queries", type=int, default=50, help="timed queries (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed queries first (default 5)")
    parser.add_argument("--k", type=int, default=None, help="neighbours per query (default CBIR_DEFAULT_K)")
    parser.add_argument("--filter-dataset", action="store_true",
                        help="restrict the search to --dataset (default: search everything, as the form does)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: torch's choice, one per core)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of tables")
    return parser.parse_args(argv)


def load_queries(dataset_name: str) -> list[tuple[int, str, bytes]]:
    from django.conf import settings

    from search.models import Dataset, Image

    dataset = Dataset.objects.filter(name=dataset_name).first()
    if dataset is None:
        raise SystemExit(f"no dataset {dataset_name!r}; import one first (python manage.py import_images ...)")
    media = Path(settings.MEDIA_ROOT)
    queries = [(pk, name, (media / name).read_bytes())
               for pk, name in Image.objects.filter(dataset=dataset).order_by("pk").values_list("pk", "file")]
    if not queries:
        raise SystemExit(f"dataset {dataset_name!r} has no images")
    return queries


def explain(version, vector, k: int, dataset) -> list[str]:
    """EXPLAIN (ANALYZE) of the exact statement nearest() runs
    (search.neighbours), with the same per-transaction HNSW options; the query
    vector is one bound parameter, so the plan shows $1, not 1,280 numbers."""
    from search.neighbours import ef_search_for, neighbours_queryset
    from search.neighbours import explain as explain_plan

    queryset = neighbours_queryset(version, vector=vector, dataset=dataset)
    return explain_plan(queryset, k, analyze=True, ef_search=ef_search_for(k, version)).splitlines()


def execution_ms(plan: list[str]) -> float | None:
    for line in plan:
        match = re.match(r"\s*Execution Time: ([0-9.]+) ms", line)
        if match:
            return float(match.group(1))
    return None


def run(args: argparse.Namespace) -> dict:
    setup_django()
    other_load = OtherLoad()
    import torch
    from django.contrib.auth.models import AnonymousUser
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.template.loader import render_to_string
    from django.test import Client, RequestFactory

    from search import neighbours, services
    from search.imaging import decode_image
    from search.models import Embedding
    from search.views import _page_context, _query_preview
    from training.core.inference import embed_batch, network_for, preprocessing_for

    if args.threads:
        torch.set_num_threads(args.threads)
    version = services.ready_version()
    k = services.parse_k(args.k)
    dataset = services.parse_dataset(args.dataset) if args.filter_dataset else None
    queries = load_queries(args.dataset)
    model, device = network_for(version)
    preprocessing = preprocessing_for(version)
    draft_size = 2 * services.input_size(version)  # what search_by_upload passes
    client = Client(raise_request_exception=True)
    factory = RequestFactory()
    post_data = {"k": str(k)}
    if dataset is not None:
        post_data["dataset"] = dataset.name

    samples: dict[str, list[float]] = {name: [] for name in STAGES + ["end-to-end"]}
    indexed = _indexed_count(version)
    last_vector = None
    for n in range(args.warmup + args.queries):
        _pk, name, data = queries[n % len(queries)]
        timed = n >= args.warmup
        times = {}

        t0 = time.perf_counter()
        decoded = decode_image(data, draft_size=draft_size)
        tensor = preprocessing(decoded.rgb)[None]
        t1 = time.perf_counter()
        vector = embed_batch(model, device, tensor)[0]
        t2 = time.perf_counter()
        hits = neighbours.nearest(version, vector=vector, k=k, dataset=dataset)
        t3 = time.perf_counter()
        preview = _query_preview(decoded.rgb)
        t4 = time.perf_counter()
        result = services.SearchResult(model=version, k=k, hits=hits)
        request = factory.post("/search/")
        request.user = AnonymousUser()
        html = render_to_string("search/results.html", _page_context(
            result=result, query_preview=preview, selected_dataset=dataset.name if dataset else "", k=k),
            request=request)
        t5 = time.perf_counter()
        times.update({"decode+preprocess": t1 - t0, "forward": t2 - t1, "sql": t3 - t2,
                      "preview": t4 - t3, "render": t5 - t4})

        upload = SimpleUploadedFile(Path(name).name, data, content_type="application/octet-stream")
        t6 = time.perf_counter()
        response = client.post("/search/", {**post_data, "image": upload})
        t7 = time.perf_counter()
        if response.status_code != 200:
            raise SystemExit(f"POST /search/ answered {response.status_code}: {response.content[:300]!r}")
        times["end-to-end"] = t7 - t6

        if dataset is None and len(hits) != min(k, indexed) or 'id="results"' not in html:
            raise SystemExit(f"query {name} gave {len(hits)} hits; expected {min(k, indexed)}")
        last_vector = vector
        if timed:
            for stage, seconds in times.items():
                samples[stage].append(seconds * 1000)

    samples["sum of stages"] = [sum(samples[s][i] for s in STAGES) for i in range(args.queries)]
    figures = {
        stage: {"median_ms": round(median(ms), 2), "p95_ms": round(percentile(ms, 95), 2), "n": len(ms)}
        for stage, ms in samples.items()
    }
    e2e = figures["end-to-end"]["median_ms"]
    for stage in STAGES:
        figures[stage]["share_of_e2e"] = round(figures[stage]["median_ms"] / e2e, 3) if e2e else None
    plan = explain(version, last_vector, k, dataset)
    index_used = f"using {hnsw.index_name(version)}" in "\n".join(plan)
    return {
        "model_version": version.name,
        "dimension": version.dimension,
        "indexed_images": indexed,
        "all_embeddings": Embedding.objects.count(),
        "query_dataset": args.dataset,
        "distinct_query_images": len(queries),
        "queries": args.queries,
        "warmup": args.warmup,
        "k": k,
        "filter_dataset": dataset.name if dataset else None,
        "device": str(device),
        "draft_size": draft_size,
        "hnsw_ef_search": neighbours.ef_search_for(k, version),
        "machine": machine_info() | {"torch_threads": torch.get_num_threads()},
        "other_load_cores": other_load.cores(),
        "stages": figures,
        "explain": plan,
        "explain_execution_ms": execution_ms(plan),
        "hnsw_index_used": index_used,
    }


def _indexed_count(version) -> int:
    return version.embeddings.count()


def print_report(report: dict) -> None:
    m = report["machine"]
    print(f"model version      {report['model_version']} ({report['dimension']}-d, device {report['device']})")
    print(f"indexed images     {report['indexed_images']} for this version "
          f"({report['all_embeddings']} embeddings in all)")
    print(f"queries            {report['queries']} timed after {report['warmup']} warm-up, cycling through "
          f"{report['distinct_query_images']} files of dataset {report['query_dataset']!r}; k={report['k']}, "
          f"filter={report['filter_dataset'] or 'none'}, ef_search={report['hnsw_ef_search']}")
    print(f"machine            {m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} threads "
          f"({m['torch_interop_threads']} inter-op), CUDA {'yes' if m['cuda'] else 'no'}, "
          f"load average at end {m['load_average']}")
    print(f"environment        {m['environment'] or '(no OMP_/MALLOC_/CBIR_ overrides)'}")
    load = report["other_load_cores"] or {}
    print(f"other load         other processes used {load.get('other_processes', '?')} cores on average "
          f"over the {load.get('seconds', '?')} s run")
    warning = busy_warning(report["other_load_cores"])
    if warning:
        print(f"WARNING            {warning}")
    print()
    rows = []
    for stage, f in report["stages"].items():
        share = f.get("share_of_e2e")
        rows.append([stage, f"{f['median_ms']:.2f}", f"{f['p95_ms']:.2f}",
                     f"{share * 100:.0f}%" if share is not None else ""])
    print(table(["stage", "median ms", "p95 ms", "of e2e median"], rows))
    print()
    print(f"EXPLAIN ANALYZE of one query as nearest() runs it "
          f"(HNSW index used: {'yes' if report['hnsw_index_used'] else 'no'}):")
    for line in report["explain"]:
        print("  " + line)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.queries < 1 or args.warmup < 0:
        raise SystemExit("--queries must be at least 1 and --warmup at least 0")
    return emit(run(args), args.json, print_report)


if __name__ == "__main__":
    sys.exit(main())
