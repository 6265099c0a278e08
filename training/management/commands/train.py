"""python manage.py train --dataset animals --arch autoencoder --epochs 3 --image-size 64
python manage.py train --dataset animals --head-only --arch efficientnet_lite0 --epochs 30 --lr 1e-3"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from tqdm import tqdm

from search.management.progress import progress_bar
from search.models import Dataset, Job, dataset_named
from training.core.config import (
    MARKS,
    MARKS_FROM,
    OBJECTIVES,
    SCHEDULERS,
    SELECT_BY,
    TrainConfig,
    check_pretrained_available,
)
from training.core.networks import head as head_network
from training.core.networks.base import WeightsUnavailable
from training.core.networks.registry import ARCHITECTURES
from training.core.runs import TrainingStopped, epoch_summary
from training.pipeline import index_and_evaluate, train_and_publish
from training.rows import check_dataset
from training.versions import create_initial_version

DEFAULTS = TrainConfig.defaults()
PAIRS = {"labels": "; pairs from labels", "augmented": "; pairs of two augmented views of one image"}


class Command(BaseCommand):
    help = ("Train a network on a dataset's train split (validating on its val split), save the best epoch as a "
            "new inactive model version and embed the dataset with it. Runs here, in the foreground, unless "
            "--job hands it to a training worker.")

    def add_arguments(self, parser):
        parser.add_argument("--dataset", required=True)
        parser.add_argument("--arch", default=None, metavar="ARCH",
                            help="architecture (the registry's, or timm:<model name> for any timm model; an unknown "
                                 "name lists them); with --head-only the frozen backbone (default "
                                 f"{head_network.DEFAULT_BACKBONE}): " + "; ".join(
                                     f"{name} ({arch.description})" for name, arch in sorted(ARCHITECTURES.items())))
        parser.add_argument("--head-only", action="store_true",
                            help="embed the dataset once with the frozen, pretrained --arch (features cached under "
                                 "CBIR_WEIGHTS_DIR/features/) and train only a projection head on the features")
        parser.add_argument("--head", choices=head_network.HEADS, default=None,
                            help="with --head-only: linear (default) or mlp; --embedding-dim sets its output size "
                                 f"(default {head_network.DEFAULT_DIMENSION})")
        parser.add_argument("--marks", choices=MARKS, default=DEFAULTS["marks"],
                            help="with --head-only: what the head learns from: the labels (none, the default), the "
                                 "dataset's relevance marks alone (only: pairs of query and result marked right or "
                                 "wrong; no labels needed), or both (with_labels)")
        parser.add_argument("--marks-from", choices=MARKS_FROM, default=DEFAULTS["marks_from"],
                            help="with --marks: whose marks: everyone's (the default: anonymous sessions' too, so "
                                 "anyone who can search can steer training) or signed-in users' and API tokens' "
                                 "owners' only (signed-in)")
        parser.add_argument("--processes", type=int, default=DEFAULTS["processes"],
                            help="train with DistributedDataParallel over this many processes on this host (one "
                                 "per GPU; gloo on the CPU); --batch-size is the global batch")
        parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
        parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="images per batch (pairs for contrastive)")
        parser.add_argument("--lr", type=float, default=DEFAULTS["learning_rate"], help="Adam learning rate")
        parser.add_argument("--embedding-dim", type=int, default=None)
        parser.add_argument("--image-size", type=int, default=None, help="input side in pixels (default 224)")
        parser.add_argument("--random-weights", action="store_true",
                            help="start from random weights even where pretrained ones exist")
        parser.add_argument("--objective", choices=OBJECTIVES, default=DEFAULTS["objective"])
        parser.add_argument("--scheduler", choices=SCHEDULERS, default=DEFAULTS["scheduler"])
        parser.add_argument("--patience", type=int, default=DEFAULTS["early_stopping_patience"], help="early stopping patience in epochs (0: off)")
        parser.add_argument("--select-by", choices=SELECT_BY, default=DEFAULTS["select_by"],
                            help="which epoch is kept: the lowest validation loss (the study's protocol), or with "
                                 "--head-only the highest validation P@10 (validation images as queries against the "
                                 "train images, on the cached features)")
        parser.add_argument("--time-limit", type=float, default=None, help="seconds of training at most")
        parser.add_argument("--no-augment", action="store_true")
        parser.add_argument("--num-workers", type=int, default=None)
        parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
        parser.add_argument("--checkpoint-dir", default=None,
                            help="where checkpoints go; one holding last.pt is resumed "
                                 "(default: a new folder under CBIR_WEIGHTS_DIR/runs/)")
        parser.add_argument("--baseline", action="store_true",
                            help="first publish, embed and evaluate the untrained starting network as "
                                 "<arch>-<dataset>-init-<n>, to compare before and after training")
        parser.add_argument("--job", action="store_true",
                            help="start a training job on a worker and follow its progress here")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, **options):
        dataset = dataset_named(options["dataset"])
        if dataset is None:
            known = ", ".join(Dataset.objects.values_list("name", flat=True)) or "none yet"
            raise CommandError(f"unknown dataset {options['dataset']!r} (datasets: {known})")
        if not options["arch"] and not options["head_only"]:
            raise CommandError("--arch is required (or --head-only, whose backbone defaults to "
                               f"{head_network.DEFAULT_BACKBONE})")
        if options["head"] and not options["head_only"]:
            raise CommandError("--head applies to --head-only training")
        head_fields = ({"architecture": "head", "backbone": options["arch"], "head": options["head"]}
                       if options["head_only"] else {"architecture": options["arch"]})
        try:
            config = TrainConfig(
                **head_fields, epochs=options["epochs"], batch_size=options["batch_size"],
                learning_rate=options["lr"], embedding_dim=options["embedding_dim"],
                objective=options["objective"], pretrained=False if options["random_weights"] else None,
                scheduler=options["scheduler"], early_stopping_patience=options["patience"],
                time_limit_s=options["time_limit"], augment=False if options["no_augment"] else None,
                num_workers=options["num_workers"], image_size=options["image_size"], seed=options["seed"],
                processes=options["processes"], select_by=options["select_by"], marks=options["marks"],
                marks_from=options["marks_from"])
            check_dataset(dataset, config)
            check_pretrained_available(config)
        except (ValueError, WeightsUnavailable) as exc:
            raise CommandError(str(exc)) from None
        if options["job"]:
            return self._as_job(dataset, config, options)
        return self._in_process(dataset, config, options)

    # --- In this process ------------------------------------------------------

    def _in_process(self, dataset: Dataset, config: TrainConfig, options) -> None:
        label = f"{config.backbone}-head" if config.head_only else config.architecture
        directory = Path(options["checkpoint_dir"]) if options["checkpoint_dir"] else (
            Path(settings.CBIR_WEIGHTS_DIR) / "runs"
            / f"{label.replace(':', '-')}-{dataset.pk}-{timezone.now():%Y%m%d-%H%M%S}")
        self.stdout.write(
            f"training {label} on {dataset.name}: {config.objective}, {config.epochs} epoch(s), "
            f"batch {config.batch_size}, lr {config.learning_rate:g}, "
            f"{'pretrained' if config.pretrained else 'random'} initial weights"
            f"{f', {config.image_size} px' if config.image_size else ''}; checkpoints in {directory}")
        if options["baseline"]:
            self._baseline(dataset, config, options)
        bar = tqdm(total=config.epochs, desc="epochs", unit="epoch", file=sys.stderr, dynamic_ncols=True,
                   disable=options["no_progress"])
        printed = [0]

        def progress(epoch: int, n_epochs: int, batch: int, n_batches: int, history: list) -> None:
            if bar.n != len(history):
                bar.n = len(history)
            bar.set_postfix_str(f"epoch {epoch} batch {batch}/{n_batches}", refresh=False)
            bar.refresh()
            for h in history[printed[0]:]:
                bar.clear()
                self.stdout.write(f"epoch {h['epoch']:>3}: {epoch_summary(h)}, {h['seconds']:.1f} s"
                                  f"{'  best' if h['best'] else ''}")
                self.stdout.flush()
            printed[0] = len(history)

        feature_bar: list = []

        def on_features(done: int, total: int) -> None:
            if not feature_bar:
                feature_bar.append(tqdm(total=total, desc="backbone features", unit="image", file=sys.stderr,
                                        dynamic_ncols=True, disable=options["no_progress"]))
            feature_bar[0].n = done
            feature_bar[0].refresh()

        embed_bar: list = []
        bars = ExitStack()  # the embedding's bar, opened once the version is published

        def on_published(version, result) -> None:
            bar.close()
            for extra in feature_bar:
                extra.close()
            embed_bar.append(bars.enter_context(progress_bar(f"embedding {dataset.name} with {version.name}",
                                                             disable=options["no_progress"])))

        def embed_progress(done: int, total: int, message: str) -> None:
            embed_bar[0](done, total, message)

        try:
            outcome = train_and_publish(
                dataset, config, checkpoint_dir=directory, progress=progress, on_features=on_features,
                on_published=on_published, embed_progress=embed_progress,
                notes=f"trained with manage.py train (checkpoints in {directory})")
        except KeyboardInterrupt:
            bar.close()
            raise CommandError(f"interrupted; resume with --checkpoint-dir {directory} and the same settings") \
                from None
        except (ValueError, WeightsUnavailable, TrainingStopped) as exc:
            bar.close()
            raise CommandError(str(exc)) from None
        finally:
            bars.close()
        result, report, evaluation = outcome.result, outcome.report, outcome.evaluation
        assert result is not None
        if result.resumed_from_epoch:
            self.stdout.write(f"(resumed after epoch {result.resumed_from_epoch})")
        for warning in result.warnings:
            self.stdout.write(f"  note: {warning}")
        self.stdout.write(
            f"best epoch {result.best_epoch} of {len(result.history)} ({result.stop_reason}, by "
            f"{config.select_by}): {epoch_summary(result.history[result.best_epoch - 1])}; "
            f"{result.seconds_per_epoch:.1f} s per epoch on {result.device} "
            f"({result.n_train} training, {result.n_val} validation images"
            f"{PAIRS.get(result.pairs or '', '')})")
        failed = f", {len(report.failed)} failed" if report.failed else ""
        self.stdout.write(f"embedded {report.embedded} image(s){failed}")
        self._print_evaluation(evaluation)
        self.stdout.write(self.style.SUCCESS(f"model version {outcome.version.name}"))

    def _baseline(self, dataset: Dataset, config: TrainConfig, options) -> None:
        """Publish, embed and evaluate the untrained starting network (--baseline)."""
        try:
            # A head run starts from its frozen backbone: that is the network to compare with.
            baseline = create_initial_version(TrainConfig(
                config.backbone, epochs=1, image_size=config.image_size, seed=config.seed)
                if config.head_only and config.backbone else config, dataset)
        except WeightsUnavailable as exc:
            raise CommandError(str(exc)) from None
        with progress_bar(f"embedding {dataset.name} with {baseline.name}", disable=options["no_progress"]) as b:
            _, evaluation = index_and_evaluate(baseline, dataset, progress=b)
        self.stdout.write(f"before training: model version {baseline.name}")
        self._print_evaluation(evaluation)

    def _print_evaluation(self, evaluation: dict | None) -> None:
        if evaluation is None:
            return
        if "skipped" in evaluation:
            self.stdout.write(f"evaluation skipped: {evaluation['skipped']}")
            return
        k, value = evaluation.get("k"), evaluation.get("precision_at_k")
        if isinstance(value, (int, float)):
            self.stdout.write(f"precision@{k} on the test split ({evaluation.get('n_queries')} queries): "
                              f"{value:.4f}")

    # --- As a job -------------------------------------------------------------

    def _as_job(self, dataset: Dataset, config: TrainConfig, options) -> None:
        from search.jobs import JobError
        from training.train_job import start_training_job

        try:
            job = start_training_job(dataset, **asdict(config))
        except (ValueError, WeightsUnavailable, JobError) as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"started training job #{job.pk}; following it (Ctrl-C stops following, not the job)")
        bar = tqdm(desc=f"job #{job.pk}", file=sys.stderr, dynamic_ncols=True, disable=options["no_progress"])
        printed = 0
        try:
            while True:
                job.refresh_from_db()
                bar.total = job.progress_total or None
                bar.n = job.progress_done
                bar.set_postfix_str(job.message[-50:], refresh=False)
                bar.refresh()
                history = (job.result or {}).get("history") or []
                for h in history[printed:]:
                    bar.clear()
                    self.stdout.write(f"epoch {h['epoch']:>3}: {epoch_summary(h)}, {h['seconds']:.1f} s")
                printed = len(history)
                if job.is_finished:
                    break
                time.sleep(1.0)
        except KeyboardInterrupt:
            bar.close()
            self.stdout.write(f"job #{job.pk} keeps running on its worker")
            return
        bar.close()
        if job.status != Job.Status.SUCCEEDED:
            raise CommandError(f"job #{job.pk} {job.status}: {job.error or job.message}")
        self._print_evaluation((job.result or {}).get("evaluation"))
        self.stdout.write(self.style.SUCCESS(f"model version {job.result.get('version')}"))
