from __future__ import annotations

from pathlib import Path

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from search import embed_jobs, jobs
from search.idx import IdxError, read_idx
from search.management.progress import wait_for_job
from search.models import Dataset, normalise_dataset_name
from training.versions import resolve_version

FASHION_DEFAULT_LIMIT = 10_000


def read_idx_count(path: Path) -> int:
    try:
        return len(read_idx(path))
    except IdxError as exc:
        raise CommandError(str(exc)) from None


class Command(BaseCommand):
    help = ("Set up the demo: import a folder of labelled images (labels from sub-folder names), or with "
            "--fashion-mnist the Fashion-MNIST IDX files, and index it with the default pretrained model through a "
            "job on a worker (in-process when no worker runs). Safe to run again: it only adds what is missing.")

    def add_arguments(self, parser):
        parser.add_argument("--path", default="/usr/share/tuxpaint/stamps/animals")
        parser.add_argument("--dataset", default="animals")
        parser.add_argument("--model", default=None)
        parser.add_argument("--fashion-mnist", metavar="DIR", default=None,
                            help="import Fashion-MNIST from DIR (its four *-idx*-ubyte.gz files; Debian: apt-get "
                                 "install dataset-fashion-mnist, /usr/share/datasets/fashion-mnist) instead of --path")
        parser.add_argument("--limit", type=int, default=FASHION_DEFAULT_LIMIT,
                            help=f"--fashion-mnist: import the first N images, the 10,000 test images first, then "
                                 f"the 60,000 training images; 0: all 70,000 (default {FASHION_DEFAULT_LIMIT:,})")

    def handle(self, *args, **options):
        if options["fashion_mnist"]:
            self._import_fashion(Path(options["fashion_mnist"]), options)
        else:
            path = Path(options["path"])
            if not path.is_dir():
                raise CommandError(f"{path} is not a folder (on Debian: apt-get install tuxpaint-stamps-default)")
            call_command("import_images", str(path), dataset=options["dataset"], labels_from_folders=True,
                         description=f"Demo images from {path}", stdout=self.stdout)
        dataset = Dataset.objects.get(name=normalise_dataset_name(options["dataset"]))
        version = resolve_version(options["model"])
        try:
            job = embed_jobs.start_embed_job(version, dataset)
        except jobs.JobsUnavailable as exc:
            self.stdout.write(f"{exc}\nindexing in this process instead")
            call_command("build_index", dataset=dataset.name, model=version.name, stdout=self.stdout)
            return
        except jobs.JobError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"indexing through job #{job.pk} (watch it at /jobs/{job.pk}/)")
        job = wait_for_job(job)
        if job.status != "succeeded":
            raise CommandError(f"job #{job.pk} {job.status}: {job.error}")
        self.stdout.write(self.style.SUCCESS(f"{dataset.name}: {job.message}; {version.name} "
                                             f"{'is active' if version.is_active or job.result.get('activated') else 'is indexed'}"))

    def _import_fashion(self, folder: Path, options) -> None:
        limit = options["limit"]
        if limit < 0:
            raise CommandError("--limit must be 0 (all) or more")
        pairs = [(folder / f"{part}-images-idx3-ubyte.gz", folder / f"{part}-labels-idx1-ubyte.gz")
                 for part in ("t10k", "train")]
        missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
        if missing:
            raise CommandError(f"Fashion-MNIST files missing: {', '.join(missing)} "
                               f"(on Debian: apt-get install dataset-fashion-mnist)")
        remaining = limit or None
        for images, labels in pairs:
            call_command("import_idx", str(images), str(labels), dataset=options["dataset"],
                         classes="fashion-mnist", limit=remaining, stdout=self.stdout,
                         description="Fashion-MNIST (Zalando Research): 28×28 greyscale clothing images, 10 classes")
            if remaining is not None:
                remaining -= min(remaining, read_idx_count(images))
                if remaining == 0:
                    break
