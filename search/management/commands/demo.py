from __future__ import annotations

from pathlib import Path

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from search import embed_jobs, jobs
from search.management.progress import wait_for_job
from search.models import Dataset
from training.versions import resolve_version


class Command(BaseCommand):
    help = ("Set up the demo: import a folder of labelled images (labels from sub-folder names) and index it with "
            "the default pretrained model through a job on a worker (in-process when no worker runs). "
            "Safe to run again: it only adds what is missing.")

    def add_arguments(self, parser):
        parser.add_argument("--path", default="/usr/share/tuxpaint/stamps/animals")
        parser.add_argument("--dataset", default="animals")
        parser.add_argument("--model", default=None)

    def handle(self, *args, **options):
        path = Path(options["path"])
        if not path.is_dir():
            raise CommandError(f"{path} is not a folder (on Debian: apt-get install tuxpaint-stamps-default)")
        call_command("import_images", str(path), dataset=options["dataset"], labels_from_folders=True,
                     description=f"Demo images from {path}", stdout=self.stdout)
        dataset = Dataset.objects.get(name=options["dataset"])
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
