"""The image's dataset copied onto each embedding row, for per-dataset partial
HNSW indexes and exact filtered scans (search/neighbours.py, docs/scaling.md).

The backfill rewrites every embedding row once, and PostgreSQL inserts each
new row version into the table's indexes, HNSW ones included: on a large
table this migration takes as long as rebuilding its HNSW indexes (see
docs/deployment.md)."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

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
        migrations.RunSQL(
            "UPDATE search_embedding e SET dataset_id = i.dataset_id FROM search_image i "
            "WHERE i.id = e.image_id AND e.dataset_id IS NULL; "
            # The deferred foreign-key checks of the UPDATE must run before ALTER TABLE.
            "SET CONSTRAINTS ALL IMMEDIATE",
            reverse_sql=migrations.RunSQL.noop,
        ),
        migrations.AlterField(
            model_name='embedding',
            name='dataset',
            field=models.ForeignKey(db_index=False, editable=False,
                                    on_delete=django.db.models.deletion.CASCADE, related_name='embeddings',
                                    to='search.dataset'),
        ),
        migrations.AddIndex(
            model_name='embedding',
            index=models.Index(fields=['dataset', 'model_version'], name='embedding_dataset_version'),
        ),
    ]
