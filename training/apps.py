from django.apps import AppConfig


class TrainingConfig(AppConfig):
    name = "training"
    verbose_name = "Models and training"
    default_auto_field = "django.db.models.BigAutoField"
