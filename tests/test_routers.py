"""Search reads go to a read replica when DATABASE_REPLICA_URL is set
(cbirsite/routers.py); writes and every other read stay on the primary."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from django.conf import settings as django_settings

from cbirsite.routers import REPLICA, SEARCH_HINT, SearchReplicaRouter
from search.models import Embedding, Image
from search.neighbours import neighbours_queryset


@pytest.fixture
def with_replica(settings):
    settings.DATABASES = {**settings.DATABASES, REPLICA: {**settings.DATABASES["default"]}}
    return settings


def test_without_a_replica_the_router_leaves_everything_to_default():
    router = SearchReplicaRouter()
    assert router.db_for_read(Embedding, **{SEARCH_HINT: True}) is None
    assert router.db_for_read(Embedding) is None and router.db_for_write(Embedding) is None


def test_with_a_replica_only_search_reads_go_there(with_replica):
    router = SearchReplicaRouter()
    assert router.db_for_read(Embedding, **{SEARCH_HINT: True}) == REPLICA
    assert router.db_for_read(Embedding) is None  # other reads: read-your-writes on the primary
    assert router.db_for_write(Embedding, **{SEARCH_HINT: True}) is None
    assert router.allow_migrate(REPLICA, "search") is False and router.allow_migrate("default", "search") is None


def test_the_neighbours_queries_are_routed_to_the_replica(with_replica, tiny_version, dataset):
    """The search statement and the plan's subset count both carry the hint."""
    assert neighbours_queryset(tiny_version, vector=np.ones(32)).db == REPLICA
    assert neighbours_queryset(tiny_version, vector=np.ones(32), dataset=dataset, plan="hnsw").db == REPLICA
    assert Image.objects.db_manager(hints={SEARCH_HINT: True}).all().db == REPLICA
    assert Embedding.objects.all().db == "default"


def test_database_replica_url_defines_the_alias_and_search_uses_it():
    """A real start-up: the replica alias from the environment answers queries
    (here it points at the same server, as Django's TEST MIRROR does in tests)."""
    code = ("import django; django.setup()\n"
            "from django.conf import settings; from django.db import connections\n"
            "from search.models import Image; from cbirsite.routers import SEARCH_HINT\n"
            "print(settings.DATABASES['replica']['TEST']['MIRROR'])\n"
            "print(Image.objects.db_manager(hints={SEARCH_HINT: True}).all().db)\n"
            "with connections['replica'].cursor() as c: c.execute('SELECT 41 + 1'); print(c.fetchone()[0])\n")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "cbirsite.settings",
           "DATABASE_REPLICA_URL": os.environ["DATABASE_URL"]}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=django_settings.BASE_DIR,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["default", REPLICA, "42"]


def test_a_bad_replica_url_stops_start_up():
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "cbirsite.settings", "DATABASE_REPLICA_URL": "mysql://x/y"}
    done = subprocess.run([sys.executable, "-c", "import django; django.setup()"], env=env,
                          cwd=django_settings.BASE_DIR, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "DATABASE_REPLICA_URL must be a postgresql:// URL" in done.stderr
