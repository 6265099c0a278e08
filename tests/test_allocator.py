"""The glibc allocator setting (training/core/allocator.py) is in effect in the
processes scripts/cbir starts, and the image and compose file set the same."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from training.core.allocator import MALLOC_ENV, glibc_malloc_probe

ROOT = Path(__file__).resolve().parent.parent
PROBE = "import json; from training.core.allocator import glibc_malloc_probe as p; print(json.dumps(p()))"

pytestmark = pytest.mark.skipif(glibc_malloc_probe() is None, reason="needs glibc ≥ 2.33 (mallinfo2)")


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in MALLOC_ENV and k != "GLIBC_TUNABLES"}


def probe(command: list[str], env: dict) -> dict:
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_by_default_glibc_hands_big_blocks_back_to_the_kernel():
    # The control: the probe tells the two behaviours apart.
    result = probe([sys.executable, "-c", PROBE], clean_env())
    assert result["large_blocks_mmapped"] and not result["keeps_freed_memory"]


def test_processes_started_by_scripts_cbir_keep_freed_memory():
    # Sourcing scripts/cbir gives exactly the environment its web server,
    # workers and commands are started with.
    command = ["bash", "-c", f'source scripts/cbir && exec "{sys.executable}" -c "$0"', PROBE]
    result = probe(command, clean_env())
    assert not result["large_blocks_mmapped"]
    assert result["keeps_freed_memory"] and result["freed_heap_bytes"] >= 64 * 1024 * 1024


def test_a_value_set_by_the_operator_wins():
    command = ["bash", "-c", 'source scripts/cbir && echo "$MALLOC_MMAP_MAX_ $MALLOC_TRIM_THRESHOLD_"']
    env = clean_env() | {"MALLOC_MMAP_MAX_": "65536"}
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split() == ["65536", MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]]


def test_the_image_and_compose_file_set_the_same_values():
    dockerfile = (ROOT / "Dockerfile").read_text()
    env_line = next(line for line in dockerfile.splitlines() if line.startswith("ENV MALLOC_"))
    assert dict(item.split("=") for item in env_line.split()[1:]) == MALLOC_ENV
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in ("web", "worker", "migrate", "flower"):
        environment = compose["services"][name]["environment"]
        defaults = {k: re.fullmatch(r"\$\{(\w+):-(\w+)\}", v).groups() for k, v in environment.items()
                    if k in MALLOC_ENV}
        assert {k: d for k, (n, d) in defaults.items() if n == k} == MALLOC_ENV, name
    script = (ROOT / "scripts" / "cbir").read_text()
    for name, value in MALLOC_ENV.items():
        assert f'export {name}="${{{name}:-{value}}}"' in script


def test_manage_py_started_directly_keeps_freed_memory():
    # No scripts/cbir, no MALLOC_* variables: the Django process applies the
    # setting itself at start-up (training.apps → training.core.allocator).
    result = probe([sys.executable, "manage.py", "shell", "-c", PROBE], clean_env())
    assert not result["large_blocks_mmapped"]
    assert result["keeps_freed_memory"] and result["freed_heap_bytes"] >= 64 * 1024 * 1024


def test_loading_a_network_outside_django_applies_it_too():
    code = ("import json; from training.core.allocator import apply_in_process, glibc_malloc_probe as p; "
            "print(apply_in_process()); print(json.dumps(p()))")
    out = subprocess.run([sys.executable, "-c", code], env=clean_env(), cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split("\n")
    assert out[0] == "applied" and json.loads(out[1])["keeps_freed_memory"]


def test_in_process_the_operators_environment_wins():
    env = clean_env() | {"MALLOC_MMAP_MAX_": "65536"}
    result = probe([sys.executable, "manage.py", "shell", "-c", PROBE], env)
    assert result["large_blocks_mmapped"] and not result["keeps_freed_memory"]
    import training.core.allocator as allocator
    from training.core.allocator import apply_in_process

    saved = allocator._applied
    try:
        allocator._applied = None
        assert apply_in_process({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=65536"}) == "environment"
    finally:
        allocator._applied = saved
