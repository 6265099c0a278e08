"""Load: the site under gunicorn, many concurrent searches from another process.

    .venv/bin/python bench/load.py [--workers 3] [--clients 20] [--duration 60] [--warmup 15]
                                   [--upload-share 0.5] [--dataset animals] [--json]

Starts gunicorn (`cbirsite.wsgi`, --workers sync workers) on 127.0.0.1 and a
free port, against the database the settings compute (the embedded one under
var/pg unless DATABASE_URL is set), with the rate limit and the login rule
off. A second process (multiprocessing, spawned) runs --clients threads that
send searches over loopback with http.client, back to back: a mix of uploads
(POST /api/search with the dataset's own files) and "more like this"
(GET /api/images/<id>/similar), both k=10. A warm-up of the same load comes
first, so that every worker has loaded the network (once per process).

Prints requests/s, median/p95/p99 latency overall and per kind, the errors
(any status but 200, or no answer), and each gunicorn worker's resident
memory after warm-up, at its peak during the run, and at the end: it should be
flat, since the network is loaded once per process and nothing is kept per
request. Bounded: stops after --duration seconds or --max-requests requests,
whichever comes first, and stops gunicorn however it ends. Loopback only.

The clients share the machine with the server: on a small machine they take
CPU the workers could have used, so the figures are a floor, not a capacity.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

# Nothing from Django or torch at import time: the spawned client process
# imports this module too and needs none of it.
REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=3, help="gunicorn worker processes (default 3)")
    parser.add_argument("--clients", type=int, default=20, help="concurrent client threads (default 20)")
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds (default 60)")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds of the same load first (default 15)")
    parser.add_argument("--upload-share", type=float, default=0.5,
                        help="share of requests that upload an image; the rest are 'more like this' (default 0.5)")
    parser.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="intra-op threads per worker (OMP_NUM_THREADS; default 1: workers x threads <= cores)")
    parser.add_argument("--dataset", default="animals", help="dataset whose images are the queries")
    parser.add_argument("--seed", type=int, default=1, help="seed of the request mix")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.clients < 1 or args.duration <= 0 or args.warmup < 0 or args.max_requests < 1:
        parser.error("--workers, --clients, --duration and --max-requests must be positive, --warmup at least 0")
    if not 0 <= args.upload_share <= 1:
        parser.error("--upload-share must be between 0 and 1")
    return args


# --- The client process -------------------------------------------------------

def _multipart(data: bytes, name: str, k: int) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n{k}\r\n".encode(),
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
        f"Content-Type: application/octet-stream\r\n\r\n".encode(),
        data,
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _one_request(port: int, kind: str, item: tuple[int, str, bytes]) -> int | str:
    """Send one search; its HTTP status, or the name of the exception."""
    image_id, name, data = item
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        if kind == "upload":
            body, content_type = _multipart(data, name, 10)
            connection.request("POST", "/api/search", body=body, headers={"Content-Type": content_type})
        else:
            connection.request("GET", f"/api/images/{image_id}/similar?k=10")
        response = connection.getresponse()
        payload = response.read()
        if response.status == 200 and b'"results"' not in payload:
            return "200-without-results"
        return response.status
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        connection.close()


def client_main(port: int, clients: int, duration: float, max_requests: int, upload_share: float, seed: int,
                items: list[tuple[int, str]], media_root: str, out) -> None:
    """Runs in its own process: `clients` threads send searches back to back
    until `duration` has passed or `max_requests` were sent; puts
    [(start offset s, latency s, kind, status)] on `out`."""
    loaded = [(pk, Path(name).name, (Path(media_root) / name).read_bytes()) for pk, name in items]
    records: list[tuple[float, float, str, int | str]] = []
    lock = threading.Lock()
    sent = [0]
    start = time.perf_counter()
    deadline = start + duration

    def run(thread_index: int) -> None:
        rng = random.Random(seed * 1000 + thread_index)
        while time.perf_counter() < deadline:
            with lock:
                if sent[0] >= max_requests:
                    return
                sent[0] += 1
            kind = "upload" if rng.random() < upload_share else "similar"
            t0 = time.perf_counter()
            status = _one_request(port, kind, rng.choice(loaded))
            t1 = time.perf_counter()
            with lock:
                records.append((t0 - start, t1 - t0, kind, status))

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=duration + 120)  # a request times out after 60 s
    out.put({"records": records, "wall_s": time.perf_counter() - start})


def run_clients(port: int, args: argparse.Namespace, duration: float, items, media_root: str,
                sample=None) -> dict:
    """One round of load from a spawned process; `sample()` is called every
    few seconds meanwhile (the parent samples the workers' memory)."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    process = context.Process(target=client_main, args=(
        port, args.clients, duration, args.max_requests, args.upload_share, args.seed, items, media_root, out))
    process.start()
    try:
        while True:
            try:
                return out.get(timeout=5)
            except Exception:  # noqa: BLE001 - queue.Empty: not finished yet
                if sample is not None:
                    sample()
                if not process.is_alive() and out.empty():
                    raise SystemExit(f"the client process ended with exit code {process.exitcode} and no results") from None
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.terminate()


# --- The server -----------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_gunicorn(args: argparse.Namespace, port: int, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.update({
        "DATABASE_URL": os.environ["DATABASE_URL"],  # what the settings computed: the same server
        "DEBUG": "0",  # DEBUG keeps every SQL statement per request in memory
        "CBIR_SEARCH_RATE_LIMIT": "0",
        "CBIR_SEARCH_REQUIRES_LOGIN": "0",
        "CBIR_PRODUCTION": "0",
        "OMP_NUM_THREADS": str(args.torch_threads),
        "MKL_NUM_THREADS": str(args.torch_threads),
        "PYTHONUNBUFFERED": "1",
    })
    command = [sys.executable, "-m", "gunicorn", "cbirsite.wsgi:application", "--bind", f"127.0.0.1:{port}",
               "--workers", str(args.workers), "--worker-class", "sync", "--timeout", "120",
               "--graceful-timeout", "10", "--backlog", "256", "--max-requests", "0", "--log-level", "warning"]
    log = log_path.open("wb")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_gunicorn(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)  # graceful: the master stops its workers
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


def wait_healthy(server: subprocess.Popen, port: int, log_path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"gunicorn exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"gunicorn did not answer /healthz within {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


def worker_rss(server: subprocess.Popen) -> dict[int, int]:
    import psutil

    rss = {}
    for child in psutil.Process(server.pid).children():
        try:
            rss[child.pid] = child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return rss


def server_cpu_seconds(server: subprocess.Popen) -> float:
    """CPU time (user + system) of the gunicorn master and its workers so far."""
    import psutil

    master = psutil.Process(server.pid)
    total = 0.0
    for process in [master, *master.children()]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


# --- Figures ----------------------------------------------------------------------

def summarise(records: list, wall_s: float) -> dict:
    from _common import median, percentile

    def stats(rows) -> dict:
        ms = [latency * 1000 for _, latency, _, _ in rows]
        return {"requests": len(rows), "median_ms": round(median(ms), 1), "p95_ms": round(percentile(ms, 95), 1),
                "p99_ms": round(percentile(ms, 99), 1), "max_ms": round(max(ms), 1) if ms else None}

    errors: dict[str, int] = {}
    for _, _, kind, status in records:
        if status != 200:
            errors[f"{kind} {status}"] = errors.get(f"{kind} {status}", 0) + 1
    ok = [r for r in records if r[3] == 200]
    return {
        "wall_s": round(wall_s, 1),
        "requests": len(records),
        "requests_per_s": round(len(records) / wall_s, 2) if wall_s else None,
        "ok_per_s": round(len(ok) / wall_s, 2) if wall_s else None,
        "errors": sum(errors.values()),
        "errors_by_kind": errors,
        "all": stats(records),
        "upload": stats([r for r in records if r[2] == "upload"]),
        "similar": stats([r for r in records if r[2] == "similar"]),
    }


def run(args: argparse.Namespace) -> dict:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cbirsite.settings")
    import django

    # Not _common.setup_django: its "all migrations applied" guard protects
    # benchmarks that write; this one only reads, and the warm-up below checks
    # that the served search path works (every request must answer 200).
    django.setup()
    from _common import OtherLoad, machine_info
    from django.conf import settings

    from search.models import Dataset, Image
    from training.models import ModelVersion

    dataset = Dataset.objects.filter(name=args.dataset).first()
    if dataset is None:
        raise SystemExit(f"no dataset {args.dataset!r}; import one first")
    items = list(Image.objects.filter(dataset=dataset, embeddings__model_version__is_active=True)
                 .order_by("pk").values_list("pk", "file"))
    if not items:
        raise SystemExit(f"dataset {args.dataset!r} has no images indexed by the active model version")
    active = ModelVersion.objects.filter(is_active=True).first()

    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="cbir-load-"))
    log_path = workdir / "gunicorn.log"
    server = start_gunicorn(args, port, log_path)
    samples: dict[int, list[int]] = {}

    def sample() -> None:
        if server.poll() is not None:
            raise SystemExit(f"gunicorn exited during the run:\n{log_path.read_text()[-3000:]}")
        for pid, rss in worker_rss(server).items():
            samples.setdefault(pid, []).append(rss)

    try:
        wait_healthy(server, port, log_path)
        warm = run_clients(port, args, args.warmup, items, str(settings.MEDIA_ROOT)) if args.warmup else None
        if warm is not None:
            bad = [r for r in warm["records"] if r[3] != 200]
            if bad:
                raise SystemExit(f"{len(bad)} of {len(warm['records'])} warm-up requests failed, e.g. {bad[:3]}; "
                                 f"server log:\n{log_path.read_text()[-3000:]}")
        after_warmup = worker_rss(server)
        other_load, cpu_before = OtherLoad(), server_cpu_seconds(server)
        measured = run_clients(port, args, args.duration, items, str(settings.MEDIA_ROOT), sample=sample)
        load, cpu_after = other_load.cores(), server_cpu_seconds(server)
        at_end = worker_rss(server)
    finally:
        stop_gunicorn(server)

    if load:
        # OtherLoad counts this script and its reaped children (the client
        # process) as its own; gunicorn is not reaped yet: take it out too.
        load["server"] = round((cpu_after - cpu_before) / load["seconds"], 2)
        load["other_processes"] = round(max(0.0, load["other_processes"] - load["server"]), 2)
    workers = []
    for pid in sorted(after_warmup):
        before, end = after_warmup[pid], at_end.get(pid)
        peak = max(samples.get(pid, []) + [before] + ([end] if end else []))
        workers.append({"pid": pid, "rss_after_warmup_mib": round(before / MIB, 1),
                        "rss_peak_mib": round(peak / MIB, 1),
                        "rss_end_mib": round(end / MIB, 1) if end else None,
                        "growth_mib": round((end - before) / MIB, 1) if end else None})
    return {
        "command": "python bench/load.py " + " ".join(sys.argv[1:]),
        "model_version": active.name if active else None,
        "dataset": args.dataset, "query_images": len(items),
        "gunicorn_workers": args.workers, "torch_threads_per_worker": args.torch_threads,
        "clients": args.clients, "warmup_s": args.warmup, "upload_share": args.upload_share,
        "warmup_requests": len(warm["records"]) if warm else 0,
        "machine": machine_info(), "other_load_cores": load,
        "figures": summarise(measured["records"], measured["wall_s"]),
        "workers": workers,
        "new_workers_during_run": sorted(set(at_end) - set(after_warmup)),
    }


def print_report(report: dict) -> None:
    from _common import table

    f, m = report["figures"], report["machine"]
    print(f"server    gunicorn, {report['gunicorn_workers']} sync workers x {report['torch_threads_per_worker']} "
          f"torch thread(s), model {report['model_version']}, 127.0.0.1")
    print(f"clients   {report['clients']} threads in a second process, {report['upload_share']:.0%} uploads "
          f"(POST /api/search) / {1 - report['upload_share']:.0%} more-like-this (GET /api/images/<id>/similar), "
          f"k=10, {report['query_images']} images of {report['dataset']!r}")
    print(f"machine   {m['cpu_count']} CPUs, torch {m['torch']}, load average at end {m['load_average']}")
    load = report["other_load_cores"] or {}
    print(f"cpu       gunicorn used {load.get('server', '?')} cores on average; processes outside this benchmark "
          f"{load.get('other_processes', '?')} cores (PostgreSQL serving the searches counts among them)")
    print(f"run       {f['wall_s']} s after {report['warmup_s']} s of warm-up ({report['warmup_requests']} requests)")
    print()
    print(f"requests  {f['requests']} ({f['requests_per_s']} /s), errors {f['errors']} {f['errors_by_kind'] or ''}")
    rows = [[kind, f[kind]["requests"], f[kind]["median_ms"], f[kind]["p95_ms"], f[kind]["p99_ms"], f[kind]["max_ms"]]
            for kind in ("all", "upload", "similar")]
    print(table(["requests", "n", "median ms", "p95 ms", "p99 ms", "max ms"], rows))
    print()
    rows = [[w["pid"], w["rss_after_warmup_mib"], w["rss_peak_mib"], w["rss_end_mib"], w["growth_mib"]]
            for w in report["workers"]]
    print(table(["worker pid", "RSS after warm-up MiB", "peak MiB", "end MiB", "growth MiB"], rows))
    if report["new_workers_during_run"]:
        print(f"WARNING   workers started during the run (one died?): {report['new_workers_during_run']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    from _common import emit

    return emit(run(args), args.json, print_report)


if __name__ == "__main__":
    sys.exit(main())
