from __future__ import annotations

import time

from django.core.management.base import BaseCommand, CommandError

from search.indexing import build_index
from search.management.progress import progress_bar
from search.models import dataset_named
from training.core.networks.base import WeightsUnavailable
from training.core.networks.registry import UnknownArchitecture
from training.versions import resolve_version


class Command(BaseCommand):
    help = ("Embed the images of a dataset that a model version has not embedded yet, write them in bulk and "
            "create the version's HNSW index. Running it again embeds nothing new.")

    def add_arguments(self, parser):
        parser.add_argument("--dataset", required=True)
        parser.add_argument("--model", default=None,
                            help="model version name, or an architecture name for its pretrained version "
                                 "(default: the active version, else efficientnet_lite0)")
        parser.add_argument("--random-weights", action="store_true",
                            help="with an architecture name: a new version with random initial weights")
        parser.add_argument("--batch-size", type=int, default=None)
        parser.add_argument("--activate", action="store_true", help="make this version the one search uses")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, **options):
        dataset = dataset_named(options["dataset"])
        if dataset is None:
            raise CommandError(f"unknown dataset {options['dataset']!r}; import images first (import_images)")
        try:
            version = resolve_version(options["model"], random_weights=options["random_weights"])
        except (UnknownArchitecture, WeightsUnavailable, ValueError) as exc:
            raise CommandError(str(exc)) from None
        start = time.perf_counter()
        try:
            with progress_bar(f"embedding {dataset.name} with {version.name}", disable=options["no_progress"]) as bar:
                report = build_index(dataset, version, batch_size=options["batch_size"], progress=bar)
        except WeightsUnavailable as exc:
            raise CommandError(str(exc)) from None
        elapsed = time.perf_counter() - start
        for image_id, reason in report.failed:
            self.stdout.write(f"  could not embed image {image_id}: {reason}")
        if options["activate"]:
            version.activate(reason="build_index --activate")
        rate = report.embedded / elapsed if elapsed > 0 and report.embedded else 0
        self.stdout.write(self.style.SUCCESS(
            f"{version.name}: embedded {report.embedded} new image(s) in {elapsed:.1f} s ({rate:.1f} img/s), "
            f"{len(report.failed)} failed; index {'created' if report.index_created else 'ready'}"
            f"{f'; {report.near_duplicates} near-duplicate pair(s) flagged' if report.near_duplicates else ''}"
            f"{'; active for search' if version.is_active else ''}"))
