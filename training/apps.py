from django.apps import AppConfig


class TrainingConfig(AppConfig):
    name = "training"
    verbose_name = "Models and training"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from search import jobs

        jobs.register_kind(jobs.JobKind("train", task="training.tasks.run_training", queue="train"))
        jobs.register_kind(jobs.JobKind("evaluate", task="training.tasks.run_evaluation", queue="train"))
