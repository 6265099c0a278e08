from io import StringIO

from django.core.management import call_command
from django.db import connection


def test_the_vector_extension_is_installed_by_the_first_migration(db):
    with connection.cursor() as cursor:
        cursor.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        row = cursor.fetchone()
    assert row is not None
    major, minor = (int(x) for x in row[0].split(".")[:2])
    assert (major, minor) >= (0, 8)  # iterative index scans


def test_models_and_migrations_agree(db):
    out = StringIO()
    call_command("makemigrations", "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()


def test_embedding_column_is_halfvec(db):
    with connection.cursor() as cursor:
        cursor.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                       "WHERE attrelid = 'search_embedding'::regclass AND attname = 'vector'")
        assert cursor.fetchone()[0] == "halfvec"
