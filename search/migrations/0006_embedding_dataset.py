"""The image's dataset copied onto each embedding row, for per-dataset partial
HNSW indexes and exact filtered scans (search/neighbours.py, docs/scaling.md).

Not one transaction, so that searches keep answering (docs/deployment.md):
the column is added (a catalogue change, instant), filled in batches of
BATCH rows, each its own short transaction, and made NOT NULL through a CHECK
constraint validated without blocking reads or writes (PostgreSQL then skips
SET NOT NULL's own scan); the b-tree is built CONCURRENTLY. Each UPDATE
inserts the new row versions into the table's indexes, HNSW ones included:
on a large table the backfill takes about as long as rebuilding its HNSW
indexes. Stop the workers while it runs: rows written meanwhile by the old
code would have no dataset (a last pass fills them before the check)."""

import django.db.models.deletion
from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models

BATCH = 10_000

FILL = ("UPDATE search_embedding e SET dataset_id = i.dataset_id FROM search_image i "
        "WHERE i.id = e.image_id AND e.dataset_id IS NULL AND e.id >= %s AND e.id < %s")


def backfill(apps, schema_editor):
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        cursor.execute("SELECT coalesce(min(id), 0), coalesce(max(id), -1) FROM search_embedding")
        low, high = cursor.fetchone()
    for start in range(low, high + 1, BATCH):
        with connection.cursor() as cursor:  # autocommit: each batch commits on its own
            cursor.execute(FILL, [start, start + BATCH])
    with connection.cursor() as cursor:  # rows written meanwhile
        cursor.execute(FILL.replace(" AND e.id >= %s AND e.id < %s", ""))


class Migration(migrations.Migration):

    atomic = False

    dependencies = [
        ('search', '0005_deletes_at_scale'),
    ]

    operations = [
        migrations.AddField(
            model_name='embedding',
            name='dataset',
            field=models.ForeignKey(db_index=False, editable=False, null=True,
                                    on_delete=django.db.models.deletion.CASCADE, related_name='embeddings',
                                    to='search.dataset'),
        ),
        migrations.RunPython(backfill, migrations.RunPython.noop),
        migrations.RunSQL(
            sql=[
                "ALTER TABLE search_embedding ADD CONSTRAINT embedding_dataset_not_null "
                "CHECK (dataset_id IS NOT NULL) NOT VALID",
                "ALTER TABLE search_embedding VALIDATE CONSTRAINT embedding_dataset_not_null",
                "ALTER TABLE search_embedding ALTER COLUMN dataset_id SET NOT NULL",
                "ALTER TABLE search_embedding DROP CONSTRAINT embedding_dataset_not_null",
            ],
            reverse_sql=["ALTER TABLE search_embedding ALTER COLUMN dataset_id DROP NOT NULL"],
            state_operations=[
                migrations.AlterField(
                    model_name='embedding',
                    name='dataset',
                    field=models.ForeignKey(db_index=False, editable=False,
                                            on_delete=django.db.models.deletion.CASCADE, related_name='embeddings',
                                            to='search.dataset'),
                ),
            ],
        ),
        AddIndexConcurrently(
            model_name='embedding',
            index=models.Index(fields=['dataset', 'model_version'], name='embedding_dataset_version'),
        ),
    ]
