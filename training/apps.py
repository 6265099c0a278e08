from django.apps import AppConfig


class TrainingConfig(AppConfig):
    name = "training"
    verbose_name = "Models and training"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from search import jobs
        from training.core import runtime
        from training.core.allocator import apply_in_process

        # Every Django process (web, workers, manage.py commands, tests), however it
        # was started, keeps freed memory in the heap (training/core/allocator.py).
        apply_in_process()
        runtime.configure(site_runtime)

        jobs.register_kind(jobs.JobKind("train", task="training.tasks.run_training", queue="train",
                                          time_limit_setting="CBIR_TRAIN_TIME_LIMIT"))
        jobs.register_kind(jobs.JobKind("evaluate", task="training.tasks.run_evaluation", queue="train",
                                          time_limit_setting="CBIR_TRAIN_TIME_LIMIT"))


def site_runtime():
    """The ML core's settings (training.core.runtime.Runtime) read from the
    site's settings on every call, so overridden settings (tests) take effect."""
    from pathlib import Path

    from django.conf import settings

    from training.core.runtime import Runtime

    return Runtime(device=settings.CBIR_DEVICE, loader_workers=settings.CBIR_LOADER_WORKERS,
                   compile_min_images=settings.CBIR_COMPILE_MIN_IMAGES, weights_dir=Path(settings.CBIR_WEIGHTS_DIR),
                   offline=settings.CBIR_OFFLINE, cpu_precision=settings.CBIR_CPU_PRECISION)
