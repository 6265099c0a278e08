"""CPU runtimes side by side: precision and runtime of the embed path, with the agreement they keep.

    .venv/bin/python bench/runtimes.py [--images 192] [--batch-size 16] [--repeats 3]
        [--architectures efficientnet_lite0,resnet50,timm:vit_small_patch16_224]
        [--runtimes eager,compiled,onnxruntime,openvino] [--no-build] [--json]

For each architecture (EfficientNet-Lite0 with its pretrained weights, the
others with seeded random weights: none are offline) it measures, on the
same real files (Tux Paint's stamps, flattened on white, labelled by folder):

  end to end   images/s of decode (training.core.preprocessing.load_rgb) +
               preprocessing + forward, batch by batch, median of --repeats,
               for each runtime:
                 torch eager float32 / bfloat16 autocast (training.core.precision),
                 torch.compile (inductor) float32 / bfloat16,
                 ONNX Runtime (CPU provider, float32; what Immich runs its models with),
                 OpenVINO (CPU, its default inference precision and f32);
               and the minimum cosine of each runtime's embeddings to torch
               eager float32's;
  quality      P@10 by label (exact cosine search over all images, each image a
               query against the others) of four indexes: embedded in float32
               or bfloat16, queried in float32 or bfloat16; and recall@10 of
               the bfloat16 top-10 against the float32 top-10;
  search       the forward stage of a search (batch 1, eager), float32 and
               bfloat16 query by query, median ms;
  training     seconds per epoch of training.core.trainer.train for --train
               (default resnet50, the study's network) in float32 and bfloat16,
               with both loss curves (same seed);
  build_index  images/s through search.indexing.build_index (the embed job's
               path: DataLoader decode, forward, upsert into PostgreSQL) in
               float32 (today's default), bfloat16, and bfloat16 with the
               decode of the next batch in a thread (measured, not adopted),
               alternating, on a scratch dataset and scratch versions deleted
               at the end (--no-build skips it); then each of the float32
               and bfloat16 versions evaluated through the project's own
               evaluation (P@10 of the test split against all images, copy
               recall@1 of --copies-per-kind copies per edit) and its ANN
               recall@10 from its search calibration.

Runtimes missing from the environment (onnxruntime, openvino: not
dependencies of the project; `.venv/bin/pip install -e '.[bench]'`) are
reported as such. The CPU's flags and
whether it has native bfloat16 (training.core.precision) head the report.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

from _common import emit, machine_info, median, setup_django, table

STAMPS = Path("/usr/share/tuxpaint/stamps")
DEFAULT_ARCHITECTURES = "efficientnet_lite0,resnet50,timm:vit_small_patch16_224"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--architectures", default=DEFAULT_ARCHITECTURES)
    parser.add_argument("--runtimes", default="eager,compiled,onnxruntime,openvino")
    parser.add_argument("--no-build", action="store_true", help="skip the build_index figures (no database)")
    parser.add_argument("--train", default="resnet50",
                        help="architectures whose training epoch is timed in both precisions ('' for none)")
    parser.add_argument("--train-epochs", type=int, default=3)
    parser.add_argument("--stages", default="runtimes,build,train",
                        help="which of runtimes (with quality and search), build, train to run")
    parser.add_argument("--copies-per-kind", type=int, default=5, help="copy detection queries per kind of edit")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def stamp_files(n: int, folder: Path) -> list[tuple[Path, str]]:
    """n stamp PNGs flattened on white into `folder`/<label>/, spread over the
    labels (the stamp's top-level category folder, e.g. animals)."""
    from PIL import Image

    by_label: dict[str, list[Path]] = {}
    for path in sorted(STAMPS.rglob("*.png")):
        if path.name.endswith(("_mirror.png", "_flip.png")):
            continue
        by_label.setdefault(path.relative_to(STAMPS).parts[0], []).append(path)
    if not by_label:
        raise SystemExit(f"no stamps under {STAMPS}: apt-get install tuxpaint-stamps-default")
    picked: list[Path] = []
    lists = [paths for _, paths in sorted(by_label.items())]
    i = 0
    while len(picked) < n and any(i < len(paths) for paths in lists):
        for paths in lists:
            if i < len(paths) and len(picked) < n:
                picked.append(paths[i])
        i += 1
    out = []
    for source in picked:
        label = source.relative_to(STAMPS).parts[0]
        target = folder / label / f"{len(out):05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(source) as image:
            rgba = image.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            flat.save(target)
        out.append((target, label))
    return out


def build_model(architecture: str):
    import torch

    from training.core.networks.registry import build_network

    torch.manual_seed(0)
    weights = "pretrained" if architecture == "efficientnet_lite0" else "random"
    return build_network(architecture, weights=weights).eval().to(memory_format=torch.channels_last)


def batches(files, preprocessing, size):
    import torch

    from training.core.preprocessing import load_rgb

    for lo in range(0, len(files), size):
        yield torch.stack([preprocessing(load_rgb(str(path), draft_size=preprocessing.size))
                           for path, _ in files[lo:lo + size]])


def torch_runner(model, precision: str, compiled: bool, example):
    """A function (N, C, H, W) float32 → (N, D) float32 numpy through
    training.core.inference.embed_batch under CBIR_CPU_PRECISION=precision."""
    import torch
    from django.conf import settings

    from training.core.inference import embed_batch

    settings.CBIR_CPU_PRECISION = precision
    net = torch.compile(model) if compiled else model
    device = torch.device("cpu")

    def run(batch):
        settings.CBIR_CPU_PRECISION = precision
        return embed_batch(net, device, batch, pad_to=len(example) if compiled else 0)

    run(example)  # warm-up (and the compile, for this shape)
    return run


def onnx_runner(model, example, workdir: Path):
    import numpy as np
    import onnxruntime
    import torch

    path = workdir / "model.onnx"
    torch.onnx.export(model, (example,), str(path), input_names=["images"], output_names=["embeddings"],
                      dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}}, dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(batch):
        return np.asarray(session.run(None, {"images": batch.contiguous().numpy()})[0], dtype=np.float32)

    run(example)
    return run


def openvino_runner(model, example, hint: str | None):
    import numpy as np
    import openvino

    converted = openvino.convert_model(model, example_input=example)
    config = {"INFERENCE_PRECISION_HINT": hint} if hint else {}
    compiled = openvino.Core().compile_model(converted, "CPU", config)
    request = compiled.create_infer_request()

    def run(batch):
        return np.asarray(request.infer({0: batch.contiguous().numpy()})[0], dtype=np.float32)

    run(example)
    return run


def runtime_table(architecture: str, files, args, workdir: Path) -> tuple[list[dict], dict]:
    import numpy as np

    model = build_model(architecture)
    pre = model.preprocessing
    example = next(batches(files, pre, args.batch_size))
    wanted = args.runtimes.split(",")
    runners: dict[str, object] = {}
    errors: dict[str, str] = {}

    def add(name, make):
        try:
            runners[name] = make()
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot run this model is reported, not fatal
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"

    add("torch eager float32", lambda: torch_runner(model, "float32", False, example))
    add("torch eager bfloat16", lambda: torch_runner(model, "bfloat16", False, example))
    if "compiled" in wanted:
        add("torch.compile float32", lambda: torch_runner(model, "float32", True, example))
        add("torch.compile bfloat16", lambda: torch_runner(model, "bfloat16", True, example))
    if "onnxruntime" in wanted:
        add("ONNX Runtime float32", lambda: onnx_runner(model, example, workdir))
    if "openvino" in wanted:
        add("OpenVINO default", lambda: openvino_runner(model, example, None))
        add("OpenVINO f32", lambda: openvino_runner(model, example, "f32"))
    rates: dict[str, list[float]] = {name: [] for name in runners}
    outputs: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for name, run in runners.items():  # alternating: a busy spell hits all of them
            start = time.perf_counter()
            vectors = []
            for batch in batches(files, pre, args.batch_size):  # a short last batch: padded by embed_batch
                vectors.append(run(batch))
            rates[name].append(len(files) / (time.perf_counter() - start))
            outputs[name] = np.concatenate(vectors)
    reference = outputs["torch eager float32"]
    rows = []
    for name in runners:
        out = outputs[name]
        out = out / np.linalg.norm(out, axis=1, keepdims=True)
        rows.append({"architecture": architecture, "runtime": name, "images_per_s": round(median(rates[name]), 1),
                     "runs": [round(r, 1) for r in rates[name]],
                     "speedup": round(median(rates[name]) / median(rates["torch eager float32"]), 2),
                     "min_cosine": round(float((out * reference).sum(axis=1).min()), 5)})
    for name, error in errors.items():
        rows.append({"architecture": architecture, "runtime": name, "error": error})
    return rows, {"float32": reference, "bfloat16": outputs.get("torch eager bfloat16")}


def search_forward(architecture: str, files, args) -> dict:
    """The forward stage of a search: embed_batch on one preprocessed query
    (batch 1, the eager network, as search.services runs it), in ms, median
    over the files, float32 and bfloat16 alternating query by query."""
    import torch
    from django.conf import settings

    from training.core.inference import embed_batch

    model = build_model(architecture)
    device = torch.device("cpu")
    tensors = [one[None] for batch in batches(files[:40], model.preprocessing, 8) for one in batch]
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for precision in times:  # warm-up: oneDNN's kernels for batch 1
        settings.CBIR_CPU_PRECISION = precision
        embed_batch(model, device, tensors[0])
    for tensor in tensors * max(1, args.repeats):
        for precision in times:
            settings.CBIR_CPU_PRECISION = precision
            start = time.perf_counter()
            embed_batch(model, device, tensor)
            times[precision].append((time.perf_counter() - start) * 1000)
    f32, bf16 = median(times["float32"]), median(times["bfloat16"])
    return {"architecture": architecture, "queries": len(times["float32"]), "float32_ms": round(f32, 2),
            "bfloat16_ms": round(bf16, 2), "ratio": round(bf16 / f32, 3)}


def training_epochs(architecture: str, files, args, workdir: Path) -> dict:
    """The study's fine-tuning on the CPU in float32 and in bfloat16 autocast:
    training.core.trainer.train (the loop the train command and job run),
    same seed and batches, --train-epochs epochs on the stamps (80 % train,
    20 % val, labelled by folder), random initial weights; seconds per epoch
    (median) and the per-epoch train losses of both."""
    import hashlib

    from django.conf import settings

    from training.core.config import TrainConfig
    from training.core.data import ImageRow, TrainingData
    from training.core.trainer import train

    rows = tuple(ImageRow(i, str(path), label, "val" if i % 5 == 0 else "train",
                          hashlib.sha256(str(path).encode()).hexdigest()) for i, (path, label) in enumerate(files, 1))
    data = TrainingData("stamps", rows)
    out: dict = {"architecture": architecture, "images": len(rows)}
    for precision in ("float32", "bfloat16"):
        settings.CBIR_CPU_PRECISION = precision
        config = TrainConfig(architecture=architecture, epochs=args.train_epochs, batch_size=args.batch_size,
                             learning_rate=1e-4, pretrained=False, augment=False, seed=0,
                             early_stopping_patience=args.train_epochs + 1)
        result = train(data, config, checkpoint_dir=workdir / f"train-{precision}", resume=False)
        out[precision] = {"seconds_per_epoch": round(median([h["seconds"] for h in result.history]), 2),
                          "train_loss": [round(h["train_loss"], 4) for h in result.history],
                          "precision": result.precision}
    out["speedup"] = round(out["float32"]["seconds_per_epoch"] / out["bfloat16"]["seconds_per_epoch"], 2)
    out["max_relative_loss_difference"] = round(max(
        abs(a - b) / abs(a) for a, b in zip(out["float32"]["train_loss"], out["bfloat16"]["train_loss"])), 4)
    return out


def quality(architecture: str, embeddings: dict, labels: list[str]) -> dict:
    """P@10 by label for index × query precision, and the bfloat16 top-10's recall of the float32 top-10."""
    import numpy as np

    labels_array = np.array(labels)

    def top10(queries, index):
        scores = queries @ index.T
        np.fill_diagonal(scores, -np.inf)
        return np.argsort(-scores, axis=1, kind="stable")[:, :10]

    out: dict = {"architecture": architecture}
    if embeddings.get("bfloat16") is None:
        return out
    tops = {}
    for index_p in ("float32", "bfloat16"):
        for query_p in ("float32", "bfloat16"):
            top = top10(embeddings[query_p], embeddings[index_p])
            tops[(index_p, query_p)] = top
            out[f"p10_index_{index_p}_query_{query_p}"] = round(float((labels_array[top] == labels_array[:, None]).mean()), 4)
    ref, mixed = tops[("float32", "float32")], tops[("bfloat16", "bfloat16")]
    out["recall10_of_float32_top10"] = round(float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ref, mixed)])), 4)
    return out


@contextlib.contextmanager
def read_ahead_in_embed_images(enabled: bool):
    """With `enabled`, search.indexing's DataLoader is replaced for the block by
    one whose iterator decodes the next batch in a thread while the network
    runs on this one (the overlap issue 21 asked to measure; not adopted:
    docs/benchmarks.md)."""
    import queue
    import threading

    from search import indexing

    if not enabled:
        yield
        return
    original = indexing.DataLoader

    class ReadAhead(original):  # type: ignore[misc, valid-type]
        def __iter__(self):
            items: queue.Queue = queue.Queue(maxsize=1)
            end = object()

            def fill():
                for item in original.__iter__(self):
                    items.put(item)
                items.put(end)

            threading.Thread(target=fill, daemon=True).start()
            while (item := items.get()) is not end:
                yield item

    indexing.DataLoader = ReadAhead
    try:
        yield
    finally:
        indexing.DataLoader = original


def build_throughput(architecture: str, folder: Path, args) -> dict:
    from django.conf import settings

    from search.indexing import build_index
    from search.ingest import import_folder
    from search.models import Dataset, Embedding
    from training.versions import get_or_create_version

    dataset = Dataset.objects.create(name=f"bench-runtimes-{int(time.time())}")
    versions: dict = {}
    try:
        import_folder(folder, dataset, labels_from_folders=True)
        n = dataset.images.count()
        base = get_or_create_version(architecture, random_weights=architecture != "efficientnet_lite0")
        from training.versions import copy_version

        # (precision, decode ahead): today's path, then bfloat16, then bfloat16 with the decode of
        # the next batch in a thread (read_ahead_in_embed_images: measured, not adopted).
        variants = {"float32": ("float32", False), "bfloat16": ("bfloat16", False),
                    "bfloat16 + read-ahead": ("bfloat16", True)}
        versions = {name: copy_version(base, f"bench-runtimes-{i}-{int(time.time())}")
                    for i, name in enumerate(variants)}
        rates: dict[str, list[float]] = {name: [] for name in versions}
        for _ in range(args.repeats):
            for name, version in versions.items():
                Embedding.objects.filter(model_version=version).delete()
                settings.CBIR_CPU_PRECISION, ahead = variants[name]
                start = time.perf_counter()
                with read_ahead_in_embed_images(ahead):
                    report = build_index(dataset, version, batch_size=args.batch_size)
                rates[name].append(report.embedded / (time.perf_counter() - start))
        from search.neighbours import CALIBRATION

        ann = {}
        for name, version in versions.items():
            version.refresh_from_db()
            calibration = (version.metrics or {}).get(CALIBRATION) or {}
            if calibration:
                ann[name] = {"ef_search": calibration["ef_search"],
                             "recall_at_10": calibration["recall"].get(str(calibration["ef_search"]))}
        # Through the project's own evaluation (training.evaluation.retrieval), each
        # version queried in the precision it was embedded in.
        from training.evaluation.retrieval import copy_detection, evaluate_version

        evaluation = {}
        for name in ("float32", "bfloat16"):
            settings.CBIR_CPU_PRECISION = variants[name][0]
            version = versions[name]
            copies = copy_detection(version, dataset, per_kind=args.copies_per_kind, seed=0)
            labels = evaluate_version(version, dataset, k=10, against="all")
            evaluation[name] = {"precision_at_10": round(labels["precision_at_k"], 4),
                                "copy_recall_at_1": copies["summary"]["all"]["recall_at_1"],
                                "copy_queries": copies["summary"]["all"]["n_queries"]}
        return {"architecture": architecture, "images": n, "ann_recall": ann, "evaluation": evaluation,
                "images_per_s": {name: round(median(r), 1) for name, r in rates.items()},
                "runs": {name: [round(x, 1) for x in r] for name, r in rates.items()},
                "speedup": {name: round(median(r) / median(rates["float32"]), 2) for name, r in rates.items()}}
    finally:
        for version in versions.values():
            version.delete()
        dataset.delete()


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_django()
    import torch

    from training.core.precision import cpu_bfloat16_support, cpu_flags

    report: dict = {"machine": machine_info(), "bfloat16_support": cpu_bfloat16_support(),
                    "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx2", "fma"))),
                    "images": args.images, "batch_size": args.batch_size, "repeats": args.repeats,
                    "runtimes": [], "quality": [], "search_forward": [], "build_index": [], "training": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        files = stamp_files(args.images, workdir / "stamps")
        labels = [label for _, label in files]
        for architecture in args.architectures.split(","):
            stages = args.stages.split(",")
            if "runtimes" in stages:
                print(f"[{architecture}] runtimes ...", file=sys.stderr, flush=True)
                rows, embeddings = runtime_table(architecture, files, args, workdir)
                report["runtimes"].extend(rows)
                report["quality"].append(quality(architecture, embeddings, labels))
                report["search_forward"].append(search_forward(architecture, files, args))
            if "build" in stages and not args.no_build:
                print(f"[{architecture}] build_index ...", file=sys.stderr, flush=True)
                report["build_index"].append(build_throughput(architecture, workdir / "stamps", args))
            torch._dynamo.reset()
        for architecture in filter(None, args.train.split(",") if "train" in args.stages.split(",") else []):
            print(f"[{architecture}] training ...", file=sys.stderr, flush=True)
            report["training"].append(training_epochs(architecture, files, args, workdir))
    return emit(report, args.json, print_report)


def print_report(report: dict) -> None:
    m = report["machine"]
    print(f"CPU: {m['cpu_count']} cores, native bfloat16: {report['bfloat16_support'] or 'none'}; flags "
          f"{' '.join(report['cpu_flags'])}; torch {m['torch']}, {m['torch_threads']} threads")
    print(f"{report['images']} images (Tux Paint stamps), batch {report['batch_size']}, median of "
          f"{report['repeats']}; load average at start {m['load_average']}\n")
    print(table(["architecture", "runtime", "img/s end to end", "× eager float32", "min cosine to float32"],
                [(r["architecture"], r["runtime"], r.get("images_per_s", r.get("error", "")), r.get("speedup", ""),
                  r.get("min_cosine", "")) for r in report["runtimes"]]))
    print()
    print(table(["architecture", "P@10 f32 index, f32 query", "bf16 index, bf16 query", "f32 index, bf16 query",
                 "bf16 index, f32 query", "recall@10 of f32 top-10"],
                [(q["architecture"], q.get("p10_index_float32_query_float32"), q.get("p10_index_bfloat16_query_bfloat16"),
                  q.get("p10_index_float32_query_bfloat16"), q.get("p10_index_bfloat16_query_float32"),
                  q.get("recall10_of_float32_top10")) for q in report["quality"]]))
    print()
    print(table(["architecture", "search forward (batch 1) float32 ms", "bfloat16 ms", "bfloat16 / float32"],
                [(f["architecture"], f["float32_ms"], f["bfloat16_ms"], f["ratio"]) for f in report["search_forward"]]))
    if report["build_index"]:
        print()
        print(table(["architecture", "images", "build_index variant", "img/s", "× float32"],
                    [(b["architecture"], b["images"], name, rate, b["speedup"][name])
                     for b in report["build_index"] for name, rate in b["images_per_s"].items()]))
        for b in report["build_index"]:
            print(f"ANN recall@10 (search calibration, HNSW against exact) {b['architecture']}: "
                  + "; ".join(f"{name} {a['recall_at_10']} at ef_search {a['ef_search']}"
                              for name, a in b["ann_recall"].items()))
            print(f"evaluation {b['architecture']} (training.evaluation.retrieval, test split against all): "
                  + "; ".join(f"{name}: P@10 {e['precision_at_10']}, copy recall@1 {e['copy_recall_at_1']} "
                              f"({e['copy_queries']} copies)" for name, e in b["evaluation"].items()))


    for t in report.get("training", []):
        print(f"\ntraining {t['architecture']} ({t['images']} images, random weights): "
              f"{t['float32']['seconds_per_epoch']} s/epoch float32, {t['bfloat16']['seconds_per_epoch']} s/epoch "
              f"bfloat16 (×{t['speedup']}); train loss float32 {t['float32']['train_loss']}, bfloat16 "
              f"{t['bfloat16']['train_loss']} (largest relative difference {t['max_relative_loss_difference']})")


if __name__ == "__main__":
    sys.exit(main())
