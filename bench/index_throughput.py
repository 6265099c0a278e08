"""Index build throughput against the network's own forward throughput.

    .venv/bin/python bench/index_throughput.py [--dataset animals] [--batch-size 32] [--repeats 3]
        [--workers N] [--threads N] [--mallopt] [--compile] [--breakdown] [--sweep] [--json]

Measures, in images per second (median over --repeats):

  forward  embed_batch on pre-made tensors (the dataset's own images,
           preprocessed before timing) in batches of --batch-size, with the
           active version's network from training.core.inference.network_for
           (channels_last, as the code does)
  build    search.indexing.embed_images over all the dataset's images:
           DataLoader decode + preprocessing, forward, bulk upsert into
           PostgreSQL; the HNSW index creation is timed once, apart

and their ratio build/forward (the goal is at least 0.8: the pipeline should
keep the network busy). Forward and build runs alternate, so a busy spell on
a shared machine hits both. CPU seconds (user/sys, loader workers included)
and minor page faults per image are printed too: they show where time goes
even when the wall clock is noisy.

The build writes to a scratch model version, "bench-scratch-<architecture>",
a copy of the active one, so the real version's rows are never touched; its
embeddings are deleted before each repeat and the version (with its HNSW
index, by the pre_delete signal) is deleted at the end.

The report says which allocator behaviour was in effect, read back from glibc
(training/core/allocator.py): every Django process, this script included,
applies MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647 itself at start-up
unless the environment sets either; run it with MALLOC_MMAP_MAX_=65536
(glibc's default, which then wins) to measure the default.

--compile    runs the network through torch.compile for both figures, as
             embedding jobs of CBIR_COMPILE_MIN_IMAGES images or more do
             (training.core.inference; the compile time is in "model load", not
             in the figures).
--breakdown  times the build's parts on their own: decode in the main
             process, the DataLoader alone, forward, DB writes.
--sweep      round-robin over loader workers 0/1/2 x torch threads 1/2,
             prefetch_factor 1, a thread-pool decoder instead of DataLoader
             processes, and the forward pass at batch sizes 1/8/32 (about
             two extra minutes on a quiet 2-core machine).
--workers / --threads set CBIR_LOADER_WORKERS / torch.set_num_threads for
the main figures; --mallopt asks for the glibc allocator setting explicitly
(every Django process now applies it at start-up, so it changes nothing
unless the environment overrides it). Environment variables such as OMP_WAIT_POLICY apply as
usual and are echoed in the report.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _common import OtherLoad, busy_warning, emit, machine_info, median, setup_django, table

GOAL = 0.8


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="animals")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="CBIR_LOADER_WORKERS for the run (default: setting)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--mallopt", action="store_true",
                        help="keep freed memory in glibc's heap (M_MMAP_MAX=0, M_TRIM_THRESHOLD=2GiB), to try "
                             "the allocator change suggested in docs/benchmarks.md")
    parser.add_argument("--compile", action="store_true", help="the network through torch.compile, as large jobs run it")
    parser.add_argument("--breakdown", action="store_true", help="time decode, loader, forward and DB writes apart")
    parser.add_argument("--sweep", action="store_true", help="try loader workers x torch threads x prefetch x batch")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1:
        parser.error("--batch-size and --repeats must be at least 1")
    return args


# --- Setup --------------------------------------------------------------------

def scratch_version(active):
    """A non-active copy of `active` that only this benchmark writes to."""
    from training.models import ModelVersion

    name = f"bench-scratch-{active.architecture}"
    fields = {f: getattr(active, f) for f in ("architecture", "config", "weights_source", "weights_path",
                                               "weights_sha256", "dimension", "preprocessing")}
    existing = ModelVersion.objects.filter(name=name).first()
    if existing is not None:
        if existing.is_active:
            raise SystemExit(f"{name} is the active model version; activate another before benchmarking")
        if all(getattr(existing, f) == v for f, v in fields.items()):
            return existing
        existing.delete()  # left over from another active version; drops its index too
    from training.versions import copy_version

    return copy_version(active, name, notes=f"benchmark scratch copy of {active.name}; safe to delete")


def dataset_items(dataset_name: str) -> list[tuple[int, str]]:
    from django.conf import settings

    from search.models import Dataset, Image

    dataset = Dataset.objects.filter(name=dataset_name).first()
    if dataset is None:
        raise SystemExit(f"no dataset {dataset_name!r}")
    media = Path(settings.MEDIA_ROOT)
    items = [(pk, str(media / f)) for pk, f in
             Image.objects.filter(dataset=dataset).order_by("pk").values_list("pk", "file")]
    if not items:
        raise SystemExit(f"dataset {dataset_name!r} has no images")
    return items


def batches(seq, size):
    return [seq[i:i + size] for i in range(0, len(seq), size)]


# --- Measurements -------------------------------------------------------------

@dataclass
class Cost:
    """CPU seconds and minor page faults, this process plus reaped children
    (the DataLoader workers)."""

    user: float = 0.0
    sys: float = 0.0
    faults: int = 0

    @staticmethod
    def now() -> Cost:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return Cost(me.ru_utime + kids.ru_utime, me.ru_stime + kids.ru_stime, me.ru_minflt + kids.ru_minflt)

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.user - other.user, self.sys - other.sys, self.faults - other.faults)

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.user + other.user, self.sys + other.sys, self.faults + other.faults)

    def per_image(self, n: int) -> dict:
        return {"user_ms": round(1000 * self.user / n, 1), "sys_ms": round(1000 * self.sys / n, 1),
                "minor_faults": round(self.faults / n)}


def forward_once(model, device, chunks, pad_to: int = 0) -> tuple[float, Cost]:
    """Images/s of embed_batch alone over the pre-made batches."""
    from training.core.inference import embed_batch

    before, start = Cost.now(), time.perf_counter()
    for chunk in chunks:
        embed_batch(model, device, chunk, pad_to=pad_to)
    return sum(len(c) for c in chunks) / (time.perf_counter() - start), Cost.now() - before


def build_once(version, image_ids, batch_size: int, embed=None, compiled: bool = False) -> tuple[float, Cost]:
    """Images/s of one full embed_images run, inserting fresh rows."""
    from search.indexing import embed_images

    embed = embed or embed_images
    version.embeddings.all().delete()
    before, start = Cost.now(), time.perf_counter()
    report = embed(version, image_ids, batch_size=batch_size, **({"compiled": True} if compiled else {}))
    seconds = time.perf_counter() - start
    cost = Cost.now() - before
    if report.embedded != len(image_ids):
        raise SystemExit(f"embedded {report.embedded} of {len(image_ids)}; failures: {report.failed[:3]}")
    return len(image_ids) / seconds, cost


def paired_rates(model, device, chunks, version, image_ids, batch_size: int, repeats: int, compiled: bool = False):
    """Forward and build measured alternately; each repeat gives a pair."""
    from training.core.inference import embed_batch

    pad_to = batch_size if compiled else 0
    embed_batch(model, device, chunks[0], pad_to=pad_to)  # warm-up: allocator, oneDNN kernels
    # Warm-up build over two batches, so loader workers have started once, untimed.
    build_once(version, image_ids[:2 * batch_size], batch_size, compiled=compiled)
    pairs, forward_cost, build_cost = [], Cost(), Cost()
    for _ in range(repeats):
        f, fc = forward_once(model, device, chunks, pad_to=pad_to)
        b, bc = build_once(version, image_ids, batch_size, compiled=compiled)
        pairs.append((f, b))
        forward_cost, build_cost = forward_cost + fc, build_cost + bc
    return pairs, forward_cost, build_cost


def replica_embed(*, prefetch_factor: int = 4, decode_threads: int = 0):
    """embed_images' loop with loader settings the real function does not
    offer: another prefetch_factor (it hard-codes 4), or, with
    decode_threads > 0, no DataLoader at all but a thread pool decoding the
    next batches while the network runs (Pillow and NumPy release the GIL).
    Same dataset class, collate, forward and upsert as embed_images."""
    from concurrent.futures import ThreadPoolExecutor

    from django.conf import settings
    from torch.utils.data import DataLoader

    from search.indexing import EmbedReport, _collate, _FileImages, write_embeddings
    from search.models import Image
    from training.core.inference import embed_batch, loader_workers, network_for, preprocessing_for

    def threaded_batches(dataset, batch_size):
        chunks = batches(list(range(len(dataset))), batch_size)
        with ThreadPoolExecutor(decode_threads) as pool:
            pending = [pool.submit(lambda c: _collate([dataset[i] for i in c]), c) for c in chunks[:2]]
            for chunk in chunks[2:] + [None] * len(pending):
                batch = pending.pop(0).result()
                if chunk is not None:
                    pending.append(pool.submit(lambda c: _collate([dataset[i] for i in c]), chunk))
                yield batch

    def embed(version, image_ids, *, batch_size):
        media = Path(settings.MEDIA_ROOT)
        items = [(pk, str(media / f)) for pk, f in
                 Image.objects.filter(pk__in=list(image_ids)).order_by("pk").values_list("pk", "file")]
        model, device = network_for(version)
        dataset = _FileImages(items, preprocessing_for(version))
        if decode_threads:
            loader = threaded_batches(dataset, batch_size)
        else:
            n = loader_workers(device) if len(items) > batch_size else 0
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=n, collate_fn=_collate,
                                prefetch_factor=prefetch_factor if n else None)
        report = EmbedReport()
        for tensors, ids, bad in loader:
            report.failed.extend(bad)
            if tensors is not None:
                report.embedded += write_embeddings(version, ids, embed_batch(model, device, tensors))
        return report

    return embed


def breakdown(version, items, chunks, model, device, batch_size: int, workers: int) -> dict:
    """Seconds for each part of the build on its own, for all images."""
    import numpy as np
    from torch.utils.data import DataLoader

    from search.indexing import _collate, _FileImages, write_embeddings
    from training.core.inference import embed_batch, preprocessing_for

    dataset = _FileImages(items, preprocessing_for(version))
    out = {}

    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    out["decode+preprocess, main process"] = time.perf_counter() - start

    start = time.perf_counter()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                        prefetch_factor=4 if workers else None)
    first = None
    for _ in loader:
        first = first or time.perf_counter() - start
    out[f"DataLoader alone ({workers} workers)"] = time.perf_counter() - start
    out["  of which to first batch"] = first

    start = time.perf_counter()
    vectors = np.concatenate([embed_batch(model, device, chunk) for chunk in chunks])
    out["forward"] = time.perf_counter() - start

    version.embeddings.all().delete()
    ids = [pk for pk, _ in items]
    start = time.perf_counter()
    for id_chunk, vec_chunk in zip(batches(ids, batch_size), batches(vectors, batch_size)):
        write_embeddings(version, id_chunk, vec_chunk)
    out["DB upsert (write_embeddings)"] = time.perf_counter() - start
    return out


def tune_glibc_malloc() -> bool:
    """Stop glibc handing big freed blocks back to the kernel
    (training.core.allocator.apply_in_process; every Django process now does
    it at start-up). True if in effect (Linux with glibc only)."""
    from training.core.allocator import apply_in_process

    return apply_in_process() in ("applied", "environment")


def time_index_creation(version) -> float:
    from search.indexing import drop_hnsw_index, ensure_hnsw_index

    drop_hnsw_index(version)
    start = time.perf_counter()
    ensure_hnsw_index(version)
    return time.perf_counter() - start


# (label, loader workers, torch threads, replica settings or None for the real embed_images)
SWEEP_BUILDS = [
    ("embed_images", 0, 1, None), ("embed_images", 1, 1, None), ("embed_images", 2, 1, None),
    ("embed_images", 0, 2, None), ("embed_images", 1, 2, None), ("embed_images", 2, 2, None),
    ("replica, prefetch_factor 1", 2, 2, {"prefetch_factor": 1}),
    ("replica, 1 decode thread", 0, 1, {"decode_threads": 1}),
    ("replica, 1 decode thread", 0, 2, {"decode_threads": 1}),
]
# (torch threads, batch size or None for --batch-size)
SWEEP_FORWARDS = [(1, None), (2, None), (2, 1), (2, 8)]


def sweep(scratch, model, device, tensors, image_ids, args) -> dict:
    """Round-robin over the configurations, so a busy spell does not land on
    one of them only; two rounds at most, to stay within a few minutes."""
    import torch
    from django.test import override_settings

    rounds = min(args.repeats, 2)
    chunks_for = {}

    def chunks(batch_size):
        if batch_size not in chunks_for:
            chunks_for[batch_size] = [torch.stack(b) for b in batches(tensors, batch_size)]
        return chunks_for[batch_size]

    forward = {c: [] for c in SWEEP_FORWARDS}
    forward_cost = {c: Cost() for c in SWEEP_FORWARDS}
    build = {c[:3]: [] for c in SWEEP_BUILDS}
    build_cost = {c[:3]: Cost() for c in SWEEP_BUILDS}
    for _ in range(rounds):
        for config in SWEEP_FORWARDS:
            threads, batch_size = config
            torch.set_num_threads(threads)
            rate, cost = forward_once(model, device, chunks(batch_size or args.batch_size))
            forward[config].append(rate)
            forward_cost[config] += cost
        for label, workers, threads, replica in SWEEP_BUILDS:
            torch.set_num_threads(threads)
            with override_settings(CBIR_LOADER_WORKERS=workers):
                embed = replica_embed(**replica) if replica else None
                rate, cost = build_once(scratch, image_ids, args.batch_size, embed=embed)
            build[(label, workers, threads)].append(rate)
            build_cost[(label, workers, threads)] += cost
    n = len(tensors) * rounds
    reference = {t: median(forward[(t, None)]) for t in (1, 2)}
    return {
        "rounds": rounds,
        "forward": [{"torch_threads": t, "batch_size": bs or args.batch_size,
                     "forward_images_per_s": round(median(rates), 1),
                     "cpu_per_image": forward_cost[(t, bs)].per_image(n)} for (t, bs), rates in forward.items()],
        "build": [{"via": label, "workers": w, "torch_threads": t,
                   "build_images_per_s": round(median(rates), 1),
                   "ratio_same_threads": round(median(rates) / reference[t], 3),
                   "ratio_best_forward": round(median(rates) / max(reference.values()), 3),
                   "cpu_per_image": build_cost[(label, w, t)].per_image(n)}
                  for (label, w, t), rates in build.items()],
    }


# --- Driver -------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    setup_django()
    import torch
    from django.conf import settings

    from search.indexing import _FileImages
    from training.core.inference import network_for, preprocessing_for
    from training.models import ModelVersion

    other_load = OtherLoad()
    mallopt = tune_glibc_malloc() if args.mallopt else False
    if args.mallopt and not mallopt:
        raise SystemExit("--mallopt needs Linux with glibc")
    from training.core.allocator import glibc_malloc_probe

    allocator = glibc_malloc_probe()  # what glibc actually does now, from the environment or --mallopt
    active = ModelVersion.active()
    if active is None:
        raise SystemExit("no active model version; build an index first")
    if args.workers is not None:
        settings.CBIR_LOADER_WORKERS = args.workers
    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    items = dataset_items(args.dataset)
    image_ids = [pk for pk, _ in items]

    compiled_batch = args.batch_size if args.compile else 0
    start = time.perf_counter()
    model, device = network_for(active, compiled_batch=compiled_batch)
    load_seconds = time.perf_counter() - start
    files = _FileImages(items, preprocessing_for(active))
    tensors = [files[i][0] for i in range(len(files))]
    chunks = [torch.stack(b) for b in batches(tensors, args.batch_size)]

    scratch = scratch_version(active)
    n = len(items)
    report: dict = {
        "model_version": active.name, "scratch_version": scratch.name, "dataset": args.dataset,
        "images": n, "batch_size": args.batch_size, "repeats": args.repeats,
        # embed_images uses no workers when everything fits in one batch
        "loader_workers": _workers(n, args.batch_size),
        "prefetch_factor": 4 if _workers(n, args.batch_size) else None,
        "torch_threads": threads, "torch_threads_default": default_threads,
        "device": str(device), "model_load_s": round(load_seconds, 2), "mallopt": mallopt,
        "compiled": bool(args.compile),
        "glibc_malloc": allocator,
    }
    try:
        network_for(scratch, compiled_batch=compiled_batch)  # its own cache entry: load it before timing
        pairs, forward_cost, build_cost = paired_rates(model, device, chunks, scratch, image_ids,
                                                       args.batch_size, args.repeats, compiled=args.compile)
        forward, build = [f for f, _ in pairs], [b for _, b in pairs]
        report.update({
            "forward_images_per_s": [round(r, 1) for r in forward],
            "build_images_per_s": [round(r, 1) for r in build],
            "forward_median": round(median(forward), 1),
            "build_median": round(median(build), 1),
            "ratio": round(median(build) / median(forward), 3),
            "ratio_per_repeat": [round(b / f, 3) for f, b in pairs],
            "forward_cpu_per_image": forward_cost.per_image(n * args.repeats),
            "build_cpu_per_image": build_cost.per_image(n * args.repeats),
        })
        report["ratio_median_of_pairs"] = round(median(report["ratio_per_repeat"]), 3)
        report["hnsw_index_creation_s"] = round(time_index_creation(scratch), 3)
        if args.breakdown:
            parts = breakdown(scratch, items, chunks, model, device, args.batch_size, report["loader_workers"])
            report["breakdown_s"] = {k: round(v, 3) for k, v in parts.items()}
        if args.sweep:
            report["sweep"] = sweep(scratch, model, device, tensors, image_ids, args)
            torch.set_num_threads(threads)
    finally:
        scratch.delete()  # cascades to its embeddings; the pre_delete signal drops its index
    report["machine"] = machine_info()
    report["other_load_cores"] = other_load.cores()
    return report


def print_report(r: dict) -> None:
    m = r["machine"]
    print(f"model version   {r['model_version']} (build writes to scratch copy {r['scratch_version']}, deleted after)")
    print(f"data            {r['images']} images of dataset {r['dataset']!r}")
    print(f"settings        batch size {r['batch_size']}, CBIR_LOADER_WORKERS {r['loader_workers']} "
          f"(prefetch_factor {r['prefetch_factor'] or '-'}), torch threads {r['torch_threads']} "
          f"(default {r['torch_threads_default']}), device {r['device']}, repeats {r['repeats']}, "
          f"glibc malloc {_allocator_text(r)}, network {'compiled (torch.compile)' if r['compiled'] else 'eager'}")
    print(f"environment     {m['environment'] or '(no OMP_/MALLOC_/CBIR_ overrides)'}")
    load = r["other_load_cores"] or {}
    print(f"machine         {m['cpu_count']} CPUs, torch {m['torch']}; other processes used "
          f"{load.get('other_processes', '?')} cores on average over the {load.get('seconds', '?')} s run")
    warning = busy_warning(r["other_load_cores"])
    if warning:
        print(f"WARNING         {warning}")
    print()
    fc, bc = r["forward_cpu_per_image"], r["build_cpu_per_image"]
    print(table(["measure", "images/s (median)", "each repeat", "CPU ms/img user+sys", "minor faults/img"], [
        ["forward only (embed_batch)", f"{r['forward_median']:.1f}", ", ".join(map(str, r["forward_images_per_s"])),
         f"{fc['user_ms']} + {fc['sys_ms']}", fc["minor_faults"]],
        ["full build (embed_images)", f"{r['build_median']:.1f}", ", ".join(map(str, r["build_images_per_s"])),
         f"{bc['user_ms']} + {bc['sys_ms']}", bc["minor_faults"]],
    ]))
    print()
    ok = "meets" if r["ratio"] >= GOAL else "BELOW"
    print(f"ratio build/forward  {r['ratio']:.2f}  ({ok} the goal of {GOAL}); per repeat "
          f"{', '.join(f'{x:.2f}' for x in r['ratio_per_repeat'])}, median of those {r['ratio_median_of_pairs']:.2f}")
    print(f"HNSW index creation  {r['hnsw_index_creation_s'] * 1000:.0f} ms for {r['images']} rows "
          f"(not in the build figure)")
    print(f"model load           {r['model_load_s']:.2f} s (once per process{', compiling included' if r['compiled'] else ''}"
          ", not in the figures)")
    if "breakdown_s" in r:
        print()
        print(f"Breakdown, one pass each over {r['images']} images:")
        print(table(["part", "seconds", "images/s"], [
            [k, f"{v:.3f}", f"{r['images'] / v:.1f}" if v and not k.startswith("  ") else ""]
            for k, v in r["breakdown_s"].items()]))
    if "sweep" in r:
        s = r["sweep"]
        print()
        print(f"Sweep, forward only (median of {s['rounds']} round-robin rounds):")
        print(table(["torch threads", "batch size", "forward img/s", "CPU ms/img user+sys"], [
            [f["torch_threads"], f["batch_size"], f"{f['forward_images_per_s']:.1f}",
             f"{f['cpu_per_image']['user_ms']} + {f['cpu_per_image']['sys_ms']}"] for f in s["forward"]]))
        print()
        print(f"Sweep, full build at batch size {r['batch_size']} (median of {s['rounds']} rounds; ratios against "
              f"forward at the same batch size):")
        print(table(["via", "loader workers", "torch threads", "build img/s", "build/forward same threads",
                     "build/best forward", "CPU ms/img user+sys"], [
            [b["via"], b["workers"], b["torch_threads"], f"{b['build_images_per_s']:.1f}",
             f"{b['ratio_same_threads']:.2f}", f"{b['ratio_best_forward']:.2f}",
             f"{b['cpu_per_image']['user_ms']} + {b['cpu_per_image']['sys_ms']}"] for b in s["build"]]))


def _allocator_text(r: dict) -> str:
    probe = r.get("glibc_malloc")
    if probe is None:
        return "unknown (not glibc ≥ 2.33)"
    how = "mallopt at start-up or the environment (training/core/allocator.py)"
    if probe["keeps_freed_memory"]:
        return f"keeps freed memory in the heap, set by {how}"
    if probe["large_blocks_mmapped"]:
        return "default: blocks over 32 MiB are mmap'd and go back to the kernel when freed"
    return "partly tuned: big blocks come from the heap but freed memory is trimmed back to the kernel"


def _workers(n_images: int, batch_size: int) -> int:
    from training.core.inference import loader_workers, resolve_device

    return loader_workers(resolve_device()) if n_images > batch_size else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return emit(run(args), args.json, print_report)


if __name__ == "__main__":
    sys.exit(main())
