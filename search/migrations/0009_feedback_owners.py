# Who searched with an upload (QueryEmbedding.user / session_key: only they can
# name it again), and one relevance mark per person, query and result.

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


def keep_the_newest_mark(apps, schema_editor):
    """Duplicates stored before the unique constraints (a double click): keep the newest."""
    Feedback = apps.get_model("search", "Feedback")
    seen = set()
    doomed = []
    for row in Feedback.objects.order_by("-created", "-pk").values_list(
            "pk", "model_version_id", "query_image_id", "query_sha256", "result_id", "user_id", "session_key"):
        pk, version, image, sha, result, user, session = row
        if user is None and not session:
            continue
        key = (version, image, sha if image is None else "", result, user, session if user is None else "")
        if key in seen:
            doomed.append(pk)
        seen.add(key)
    Feedback.objects.filter(pk__in=doomed).delete()


def forget_ownerless_uploads(apps, schema_editor):
    """Uploads remembered before the owner was: nobody may name them now."""
    apps.get_model("search", "QueryEmbedding").objects.all().delete()


class Migration(migrations.Migration):

    dependencies = [
        ('search', '0008_feedback'),
        ('training', '0003_activation_log'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name='queryembedding',
            name='unique_query_per_version',
        ),
        migrations.AddField(
            model_name='queryembedding',
            name='session_key',
            field=models.CharField(blank=True, max_length=40),
        ),
        migrations.AddField(
            model_name='queryembedding',
            name='user',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, related_name='+', to=settings.AUTH_USER_MODEL),
        ),
        migrations.RunPython(forget_ownerless_uploads, migrations.RunPython.noop),
        migrations.RunPython(keep_the_newest_mark, migrations.RunPython.noop),
        migrations.AddConstraint(
            model_name='feedback',
            constraint=models.UniqueConstraint(condition=models.Q(('query_image__isnull', False), ('user__isnull', False)), fields=('model_version', 'query_image', 'result', 'user'), name='unique_mark_user_image'),
        ),
        migrations.AddConstraint(
            model_name='feedback',
            constraint=models.UniqueConstraint(condition=models.Q(('query_image__isnull', True), ('user__isnull', False)), fields=('model_version', 'query_sha256', 'result', 'user'), name='unique_mark_user_upload'),
        ),
        migrations.AddConstraint(
            model_name='feedback',
            constraint=models.UniqueConstraint(condition=models.Q(('query_image__isnull', False), ('user__isnull', True), models.Q(('session_key', ''), _negated=True)), fields=('model_version', 'query_image', 'result', 'session_key'), name='unique_mark_session_image'),
        ),
        migrations.AddConstraint(
            model_name='feedback',
            constraint=models.UniqueConstraint(condition=models.Q(('query_image__isnull', True), ('user__isnull', True), models.Q(('session_key', ''), _negated=True)), fields=('model_version', 'query_sha256', 'result', 'session_key'), name='unique_mark_session_upload'),
        ),
        migrations.AddConstraint(
            model_name='queryembedding',
            constraint=models.UniqueConstraint(condition=models.Q(('user__isnull', False)), fields=('model_version', 'sha256', 'user'), name='unique_query_per_user'),
        ),
        migrations.AddConstraint(
            model_name='queryembedding',
            constraint=models.UniqueConstraint(condition=models.Q(('user__isnull', True)), fields=('model_version', 'sha256', 'session_key'), name='unique_query_per_session'),
        ),
    ]
