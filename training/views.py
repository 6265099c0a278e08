"""The model comparison page, its example queries and its exports.

Everything here reads what the `evaluate` command or an evaluation job saved
on ModelVersion.metrics ("evaluation" and "copy_detection", per dataset): no
network is loaded and no search is run by these views."""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, render
from django.utils import timezone
from django.utils.http import content_disposition_header
from django.views.decorators.http import require_GET

from search.models import Job
from search.neighbours import CALIBRATION, ef_search_for
from training.models import ModelVersion

# The study's published counts: one query each, top 10 ("6 similar / 4 dissimilar").
STUDY_REFERENCE = [("autoencoder", 6, 4), ("VGG16", 4, 6), ("ResNet50", 3, 7), ("Siamese", 2, 8)]
STUDY_LABEL = "study (one query)"

# Columns compared across versions: (key, heading, which way is better).
COLUMNS = [
    ("training_seconds", "training time", "low"),
    ("precision_at_k", "P@k", "high"),
    ("map_at_k", "mAP@k", "high"),
    ("mean_similar", "similar of k", "high"),
    ("mean_dissimilar", "dissimilar of k", "low"),
    ("copy_recall_at_1", "copy R@1", "high"),
    ("marks_precision_at_k", "P@k on marks", "high"),
    ("median_latency_ms", "latency (ms)", "low"),
]
COLUMN_TITLES = {
    "training_seconds": "training time (metrics.training.seconds)",
    "precision_at_k": "mean precision at k over the test queries",
    "map_at_k": "mean average precision at k",
    "mean_similar": "mean number of results with the query's label among the first k",
    "mean_dissimilar": "mean number of results with another label among the first k",
    "copy_recall_at_1": "copy detection: fraction of modified copies whose original came first (all kinds)",
    "median_latency_ms": "median time of the search SQL statement",
    "marks_precision_at_k": "P@k against held-out relevance marks (queries of the test split; each query's marked "
                            "results ranked by the version, the share of right ones in the first min(k, right marks))",
}
CURVE_COLOURS = ["#2458d6", "#d6456b", "#1e7b34", "#c77c02", "#7b3fc4", "#0f8c8c", "#5b6478", "#b3261e",
                 "#8fb4ff", "#e59bd2", "#9ccf6b", "#1d2433"]


@dataclass
class ModelRow:
    """One model version's line of the comparison (None where not measured)."""

    id: int
    name: str
    architecture: str
    dimension: int
    weights_source: str
    is_active: bool
    training_seconds: float | None = None
    precision: str = ""  # what its embeddings were computed in ("bfloat16", "float32, bfloat16"; metrics)
    train_job_id: int | None = None
    evaluated: str | None = None
    k: int | None = None
    against: str | None = None
    n_queries: int | None = None
    precision_at_k: float | None = None
    recall_at_k: float | None = None
    map_at_k: float | None = None
    mean_similar: float | None = None
    mean_dissimilar: float | None = None
    ann_recall_at_k: float | None = None
    median_latency_ms: float | None = None
    copy_recall_at_1: float | None = None
    copy_recall_at_10: float | None = None
    copy_evaluated: str | None = None
    marks_precision_at_k: float | None = None
    marks_queries: int | None = None
    precision_curve: list[float] = field(default_factory=list)
    best: dict[str, bool] = field(default_factory=dict)
    # search/calibration.py's measurement: the version's ef_search and its recall@k there
    search_ef: int | None = None
    search_recall: float | None = None
    search_queries: int | None = None
    search_ef_used: int | None = None  # differs from search_ef when CBIR_HNSW_EF_SEARCH fixes the breadth

    @property
    def has_examples(self) -> bool:
        return self.evaluated is not None

    @property
    def cells(self) -> list[dict[str, Any]]:
        """The compared columns, formatted, in COLUMNS order."""
        return [{"key": key, "text": _format(key, getattr(self, key)), "best": self.best.get(key, False)}
                for key, _, _ in COLUMNS]


def _format(key: str, value: float | None) -> str:
    if value is None:
        return "—"
    if key == "training_seconds":
        return f"{value / 60:.1f} min" if value >= 60 else f"{value:.0f} s"
    if key in ("mean_similar", "mean_dissimilar"):
        return f"{value:.1f}"
    if key == "median_latency_ms":
        return f"{value:.2f}"
    if key.startswith("copy_"):
        return f"{value:.2f}"
    return f"{value:.3f}"


def evaluated_datasets(versions) -> list[str]:
    """Dataset names with results on any version, the most evaluated first."""
    counts: Counter = Counter()
    for version in versions:
        metrics = version.metrics or {}
        names = set(metrics.get("evaluation") or {}) | set(metrics.get("copy_detection") or {})
        counts.update(names)
    return sorted(counts, key=lambda name: (-counts[name], name))


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def model_row(version: ModelVersion, dataset: str | None, train_jobs: dict[int, int]) -> ModelRow:
    metrics = version.metrics or {}
    row = ModelRow(id=version.pk, name=version.name, architecture=version.architecture,
                   dimension=version.dimension, weights_source=version.get_weights_source_display(),
                   is_active=version.is_active, train_job_id=train_jobs.get(version.pk),
                   training_seconds=_number((metrics.get("training") or {}).get("seconds")),
                   precision=", ".join(str(p) for p in metrics.get("embedding_precision") or []))
    evaluation = (metrics.get("evaluation") or {}).get(dataset) if dataset else None
    if isinstance(evaluation, dict):
        row.evaluated = evaluation.get("date")
        row.k = evaluation.get("k")
        row.against = evaluation.get("against")
        row.n_queries = evaluation.get("n_queries")
        for key in ("precision_at_k", "recall_at_k", "map_at_k", "mean_similar", "mean_dissimilar",
                    "ann_recall_at_k", "median_latency_ms", "marks_precision_at_k"):
            setattr(row, key, _number(evaluation.get(key)))
        row.marks_queries = evaluation.get("marks_queries")
        row.precision_curve = [float(p) for p in evaluation.get("precision_curve") or []]
    calibrated = metrics.get(CALIBRATION)
    if isinstance(calibrated, dict) and calibrated.get("ef_search"):
        row.search_ef = int(calibrated["ef_search"])
        row.search_recall = _number((calibrated.get("recall") or {}).get(str(row.search_ef)))
        row.search_queries = calibrated.get("queries")
        row.search_ef_used = ef_search_for(10, version)
    copies = (metrics.get("copy_detection") or {}).get(dataset) if dataset else None
    if isinstance(copies, dict):
        pooled = (copies.get("summary") or {}).get("all") or {}
        row.copy_recall_at_1 = _number(pooled.get("recall_at_1"))
        row.copy_recall_at_10 = _number(pooled.get("recall_at_10"))
        row.copy_evaluated = copies.get("date")
    return row


def _mark_best(rows: list[ModelRow]) -> None:
    """Flag the best value of each column (ties all flagged); only measured rows
    compete, and a column with fewer than two values has no "best"."""
    for key, _, better in COLUMNS:
        values = [getattr(row, key) for row in rows if getattr(row, key) is not None]
        if len(values) < 2:
            continue
        best = max(values) if better == "high" else min(values)
        for row in rows:
            row.best[key] = getattr(row, key) == best


def comparison(dataset: str | None = None) -> dict[str, Any]:
    """Rows for every model version on `dataset` (default: the dataset most
    versions were evaluated on), the datasets to choose from and the study's
    reference counts."""
    versions = list(ModelVersion.objects.order_by("created", "pk"))
    datasets = evaluated_datasets(versions)
    if dataset not in datasets:
        dataset = datasets[0] if datasets else None
    train_jobs: dict[int, int] = {}
    for job_id, version_id in (Job.objects.filter(kind=Job.Kind.TRAIN, model_version__isnull=False)
                               .order_by("created").values_list("pk", "model_version_id")):
        train_jobs[version_id] = job_id  # the latest training job that produced the version
    rows = [model_row(version, dataset, train_jobs) for version in versions]
    _mark_best(rows)
    ks = Counter(row.k for row in rows if row.k)
    return {"dataset": dataset, "datasets": datasets, "rows": rows, "k": ks.most_common(1)[0][0] if ks else 10,
            "study": [{"model": name, "similar": s, "dissimilar": d, "queries": 1} for name, s, d in STUDY_REFERENCE]}


def precision_plot(rows: list[ModelRow], *, width: int = 900, height: int = 340) -> dict[str, Any] | None:
    """Geometry of an inline SVG of precision@k against k, one line per version."""
    curves = [(row, row.precision_curve) for row in rows if row.precision_curve]
    if not curves:
        return None
    left, right, top, bottom = 48, 16, 12, 36
    max_k = max(len(curve) for _, curve in curves)
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(k: int) -> float:
        return left + (plot_w * (k - 1) / (max_k - 1) if max_k > 1 else plot_w / 2)

    def y(p: float) -> float:
        return top + plot_h * (1 - max(0.0, min(1.0, p)))

    lines = []
    for index, (row, curve) in enumerate(curves):
        points = " ".join(f"{x(k):.1f},{y(p):.1f}" for k, p in enumerate(curve, start=1))
        lines.append({"name": row.name, "colour": CURVE_COLOURS[index % len(CURVE_COLOURS)], "points": points})
    step = 10 if max_k > 20 else 5 if max_k > 5 else 1
    x_ticks = sorted({1, *range(step, max_k + 1, step)})
    return {
        "width": width, "height": height, "left": left, "right": width - right, "top": top,
        "bottom": top + plot_h, "lines": lines, "max_k": max_k,
        "x_ticks": [{"k": k, "x": round(x(k), 1)} for k in x_ticks],
        "y_ticks": [{"label": f"{p:.2f}", "y": round(y(p), 1)} for p in (0, 0.25, 0.5, 0.75, 1.0)],
        "x_label_y": height - 4, "mid_x": left + plot_w / 2,
    }


# --- Views --------------------------------------------------------------------

@require_GET
def models_page(request: HttpRequest) -> HttpResponse:
    context = comparison(request.GET.get("dataset"))
    context["plot"] = precision_plot(context["rows"])
    k = context["k"]
    context["headings"] = [
        {"key": key, "text": heading.replace("@k", f"@{k}").replace("of k", f"of {k}"),
         "title": f"{COLUMN_TITLES[key]}; {'higher' if better == 'high' else 'lower'} is better"}
        for key, heading, better in COLUMNS]
    context["study_label"] = STUDY_LABEL
    counts = {"mean_similar": "similar", "mean_dissimilar": "dissimilar"}
    context["study_rows"] = [
        {"model": study["model"],
         "cells": [str(study[counts[key]]) if key in counts else "—" for key, _, _ in COLUMNS]}
        for study in context["study"]]
    return render(request, "training/models.html", context)


@require_GET
def model_examples(request: HttpRequest, version_id: int) -> HttpResponse:
    version = get_object_or_404(ModelVersion, pk=version_id)
    evaluations = (version.metrics or {}).get("evaluation") or {}
    dataset = request.GET.get("dataset")
    if dataset not in evaluations:
        dataset = next(iter(sorted(evaluations)), None)
    evaluation = evaluations.get(dataset) if dataset else None
    examples = []
    for example in (evaluation or {}).get("examples") or []:
        examples.append({**example, "thumbnail_url": settings.MEDIA_URL + example.get("thumbnail", ""),
                         "results": [{**hit, "thumbnail_url": settings.MEDIA_URL + hit.get("thumbnail", "")}
                                     for hit in example.get("results") or []]})
    return render(request, "training/examples.html", {
        "version": version, "dataset": dataset, "datasets": sorted(evaluations), "evaluation": evaluation,
        "examples": examples})


def _export_rows(context: dict) -> list[dict[str, Any]]:
    rows = []
    for row in context["rows"]:
        data = asdict(row)
        data.pop("best")
        data["source"] = "measured"
        rows.append(data)
    return rows


@require_GET
def report_json(request: HttpRequest) -> JsonResponse:
    context = comparison(request.GET.get("dataset"))
    return JsonResponse({
        "dataset": context["dataset"], "datasets": context["datasets"],
        "generated": timezone.now().isoformat(timespec="seconds"),
        "models": _export_rows(context), "study_reference": context["study"],
    }, json_dumps_params={"indent": 2})


CSV_FIELDS = ["source", "name", "architecture", "dimension", "weights_source", "is_active", "training_seconds",
              "k", "against", "n_queries", "precision_at_k", "recall_at_k", "map_at_k", "mean_similar",
              "mean_dissimilar", "ann_recall_at_k", "median_latency_ms", "copy_recall_at_1", "copy_recall_at_10",
              "evaluated", "train_job_id", "marks_precision_at_k"]


@require_GET
def report_csv(request: HttpRequest) -> HttpResponse:
    context = comparison(request.GET.get("dataset"))
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    name = f"models-{context['dataset'] or 'none'}.csv"
    # Any dataset name (quotes, CR/LF, non-ASCII) makes a valid header this way (RFC 6266 filename*).
    response["Content-Disposition"] = content_disposition_header(True, name) or "attachment"
    writer = csv.DictWriter(response, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for data in _export_rows(context):
        writer.writerow({key: "" if data.get(key) is None else data[key] for key in CSV_FIELDS})
    for study in context["study"]:
        writer.writerow({"source": STUDY_LABEL, "name": study["model"], "k": 10, "n_queries": 1,
                         "mean_similar": study["similar"], "mean_dissimilar": study["dissimilar"]})
    return response
