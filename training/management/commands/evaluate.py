from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from search.management.progress import progress_bar
from search.models import Dataset, dataset_named
from training.evaluation.copies import KINDS
from training.evaluation.retrieval import (
    AGAINST,
    EvaluationError,
    copy_detection,
    evaluate_version,
    save_copy_detection,
    save_evaluation,
)
from training.models import ModelVersion


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


class Command(BaseCommand):
    help = ("Measure a model version on a labelled dataset: every test image is a query against the train and "
            "validation images (precision, recall, mAP at k, the study's similar/dissimilar counts, ANN recall); "
            "with --copies also how well modified copies find their originals. Results are saved on the model "
            "version (see docs/evaluation.md).")

    def add_arguments(self, parser):
        parser.add_argument("--dataset", required=True)
        parser.add_argument("--model", default=None, help="model version name (default: the active version)")
        parser.add_argument("--k", type=int, default=10, help="depth of the metrics (default 10)")
        parser.add_argument("--against", choices=list(AGAINST), default="trainval",
                            help="search the train+validation images (default) or the whole dataset minus the query")
        parser.add_argument("--no-exact", action="store_true",
                            help="skip the exact (sequential scan) search, so no ANN recall")
        parser.add_argument("--exact-queries", type=int, default=None,
                            help="test queries (spread over the split) that also get the exact search "
                                 "(default CBIR_EVAL_EXACT_QUERIES, 500; 0: every query)")
        parser.add_argument("--curve-max-k", type=int, default=50, help="precision@k curve up to this k")
        parser.add_argument("--copies", action="store_true", help="also measure copy detection")
        parser.add_argument("--per-kind", type=int, default=10, help="copies per kind of change (default 10)")
        parser.add_argument("--seed", type=int, default=0, help="seed of the copies (default 0)")
        parser.add_argument("--kinds", default=",".join(KINDS),
                            help=f"comma-separated kinds of copies (default: all: {','.join(KINDS)})")
        parser.add_argument("--json", action="store_true", help="print the results as JSON")
        parser.add_argument("--no-save", action="store_true", help="do not store the results on the model version")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, **options):
        dataset = dataset_named(options["dataset"])
        if dataset is None:
            known = ", ".join(Dataset.objects.values_list("name", flat=True)) or "none yet"
            raise CommandError(f"unknown dataset {options['dataset']!r} (datasets: {known})")
        version = self._version(options["model"])
        if options["k"] < 1 or options["curve_max_k"] < 1 or options["per_kind"] < 1:
            raise CommandError("--k, --curve-max-k and --per-kind must be at least 1")
        kinds = [kind.strip() for kind in options["kinds"].split(",") if kind.strip()]
        unknown = [kind for kind in kinds if kind not in KINDS]
        if unknown or not kinds:
            raise CommandError(f"unknown kind(s) of copy {', '.join(unknown) or '(none given)'}; "
                               f"known: {', '.join(KINDS)}")
        quiet = options["no_progress"]
        copies = None
        try:
            with progress_bar(f"evaluating {version.name} on {dataset.name}", unit="query", disable=quiet) as bar:
                evaluation = evaluate_version(version, dataset, k=options["k"], against=options["against"],
                                              exact=not options["no_exact"], curve_max_k=options["curve_max_k"],
                                              progress=bar, exact_queries=options["exact_queries"])
            if options["copies"]:
                with progress_bar("copy detection", unit="copy", disable=quiet) as bar:
                    copies = copy_detection(version, dataset, per_kind=options["per_kind"], seed=options["seed"],
                                            kinds=kinds, progress=bar)
        except EvaluationError as exc:
            raise CommandError(str(exc)) from None
        if not options["no_save"]:
            save_evaluation(version, evaluation)
            if copies is not None:
                save_copy_detection(version, copies)
        if options["json"]:
            self.stdout.write(json.dumps({"evaluation": evaluation, "copy_detection": copies}, indent=2))
            return
        self._print_evaluation(evaluation)
        if copies is not None:
            self._print_copies(copies)
        if not options["no_save"]:
            self.stdout.write(self.style.SUCCESS(f"saved on model version {version.name}"))

    def _version(self, name: str | None) -> ModelVersion:
        if not name:
            version = ModelVersion.active()
            if version is None:
                raise CommandError("no model version is active; name one with --model, or build an index first "
                                   "(python manage.py build_index --dataset NAME)")
            return version
        version = ModelVersion.objects.filter(name=name).first()
        if version is None:
            known = ", ".join(ModelVersion.objects.values_list("name", flat=True)) or "none yet"
            raise CommandError(f"unknown model version {name!r} (versions: {known})")
        return version

    def _print_evaluation(self, r: dict) -> None:
        k = r["k"]
        searched = "train+validation" if r["against"] == "trainval" else "the whole dataset (minus the query)"
        out = self.stdout.write
        out(f"{r['model']} on {r['dataset']}: {r['n_queries']} test queries against {searched} "
            f"({r['n_searched']} images), k={k}")
        rows = [
            (f"precision@{k}", _fmt(r["precision_at_k"])),
            (f"recall@{k}", _fmt(r["recall_at_k"])),
            (f"mAP@{k}", _fmt(r["map_at_k"])),
            (f"similar / dissimilar of {k}", f"{_fmt(r['mean_similar'], 2)} / {_fmt(r['mean_dissimilar'], 2)}"),
            (f"ANN recall@{k} (vs exact)", f"{_fmt(r['ann_recall_at_k'])} ({r.get('n_ann_queries')} queries)"
             if r["exact"] else "not measured"),
            ("median query latency", f"{r['median_latency_ms']:.2f} ms (SQL)"),
            ("queries without relevant items", str(r["n_skipped_no_relevant"])),
        ]
        for name, value in rows:
            out(f"  {name:<34} {value}")
        curve = r["precision_curve"]
        points = [p for p in (1, 5, 10, 20, 50) if p <= len(curve)]
        out("  precision@k curve: " + ", ".join(f"k={p}: {curve[p - 1]:.3f}" for p in points))

    def _print_copies(self, c: dict) -> None:
        out = self.stdout.write
        out(f"copy detection: {c['per_kind']} copies per kind (seed {c['seed']}), searched {c['depth']} deep "
            f"in {c['dataset']}")
        out(f"  {'kind':<22} {'R@1':>6} {'R@10':>6} {'mean rank':>10} {'not found':>10}")
        for kind, row in c["summary"].items():
            out(f"  {kind:<22} {_fmt(row['recall_at_1'], 2):>6} {_fmt(row['recall_at_10'], 2):>6} "
                f"{_fmt(row['mean_rank'], 2):>10} {row['n_not_found']:>10}")
