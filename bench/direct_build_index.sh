#!/usr/bin/env bash
# `manage.py build_index` started directly (no scripts/cbir, no MALLOC_* in the
# environment) against the same command with scripts/cbir's environment, and
# against glibc's default behaviour (MALLOC_MMAP_MAX_=65536: the operator's
# value wins, so nothing is tuned, as a directly started process was before
# training/core/allocator.py applied the setting itself).
#
#   bench/direct_build_index.sh [IMAGES=300] [REPEATS=2]
#
# Imports IMAGES Tux Paint stamps (flattened on white) into a scratch dataset,
# then for each repeat and each mode deletes the dataset's embeddings of the
# default version and runs build_index, printing its summary line. The
# scratch dataset is deleted at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGES="${1:-300}"; REPEATS="${2:-2}"
PY=.venv/bin/python
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
DIR="$(mktemp -d)"; NAME="bench-direct-$$"
trap '$PY manage.py shell -c "from search.models import Dataset; Dataset.objects.filter(name=\"$NAME\").delete()" >/dev/null 2>&1; rm -rf "$DIR"' EXIT
$PY - "$DIR" "$IMAGES" <<'PY'
import sys; sys.path.insert(0, "bench")
from pathlib import Path
from runtimes import stamp_files
stamp_files(int(sys.argv[2]), Path(sys.argv[1]))
PY
$PY manage.py import_images "$DIR" --dataset "$NAME" --labels-from-folders --no-progress >/dev/null
clean() { env -u MALLOC_MMAP_MAX_ -u MALLOC_TRIM_THRESHOLD_ -u GLIBC_TUNABLES "$@"; }
for r in $(seq "$REPEATS"); do
  for mode in default direct scripts; do
    $PY manage.py shell -c "from search.models import Embedding; Embedding.objects.filter(dataset__name='$NAME').delete()" >/dev/null
    case $mode in
      default) line=$(clean MALLOC_MMAP_MAX_=65536 $PY manage.py build_index --dataset "$NAME" --no-progress | grep "embedded") ;;
      direct)  line=$(clean $PY manage.py build_index --dataset "$NAME" --no-progress | grep "embedded") ;;
      scripts) line=$(clean MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647 $PY manage.py build_index --dataset "$NAME" --no-progress | grep "embedded") ;;
    esac
    echo "repeat $r  $mode: $line"
  done
done
