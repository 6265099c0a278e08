from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from search import calibration
from search.management.progress import progress_bar
from search.neighbours import ef_search_for
from training.models import ModelVersion

DEFAULT_QUERIES = 50  # when CBIR_HNSW_CALIBRATION_QUERIES is 0 (no calibration after builds)


class Command(BaseCommand):
    help = ("Measure a model version's recall@10 at growing HNSW search breadths (ef_search) on a sample of its own "
            "rows and keep the smallest that reaches the target recall; searches of that version then use it. "
            "Embedding jobs do this after building an index; run it for a version indexed before, or to re-measure.")

    def add_arguments(self, parser):
        parser.add_argument("version", nargs="?", default=None, help="model version name (default: the active one)")
        parser.add_argument("--queries", type=int, default=None,
                            help="queries, each made from a sampled row and costing two exact scans (default CBIR_HNSW_CALIBRATION_QUERIES)")
        parser.add_argument("--target", type=float, default=None,
                            help="recall@10 to reach (default CBIR_HNSW_TARGET_RECALL)")
        parser.add_argument("--dry-run", action="store_true", help="measure and print; store nothing")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, **options):
        name = options["version"]
        version = ModelVersion.objects.filter(name=name).first() if name else ModelVersion.active()
        if version is None:
            raise CommandError(f"unknown model version {name!r}" if name else "no active model version; name one")
        if options["queries"] is not None and options["queries"] < 1:
            raise CommandError("--queries must be at least 1")
        before = ef_search_for(10, version)
        try:
            with progress_bar(f"calibrating {version.name}", unit="query", disable=options["no_progress"]) as bar:
                result = calibration.calibrate(version, queries=options["queries"] or settings.CBIR_HNSW_CALIBRATION_QUERIES
                                               or DEFAULT_QUERIES, target=options["target"], progress=bar)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if result is None:
            raise CommandError(f"{version.name} has too few embeddings to measure recall (more than 10 needed, not "
                               "all duplicates of one another)")
        curve = ", ".join(f"{ef}: {r:.3f} (≥ {result.lower_bound[ef]:.3f})" for ef, r in result.recall.items())
        self.stdout.write(f"recall@{result.k} by ef_search (95 % lower bound): {curve}")
        if not options["dry_run"]:
            calibration.save(version, result)
        after = ef_search_for(10, version)
        note = "" if options["dry_run"] or after == result.ef_search else \
            f" (searches use {after}: CBIR_HNSW_EF_SEARCH is set)"
        self.stdout.write(self.style.SUCCESS(
            f"{version.name}: {result.describe()}; {'not stored (dry run)' if options['dry_run'] else 'stored'}, "
            f"ef_search was {before}, now {after}{note}"))
