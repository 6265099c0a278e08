"""The activation gate: before search switches to another model version, its
measured quality next to the active one's on the same sets, and what gets
worse; and rolling back to the version active before.

The sets are the active version's evaluations (metrics["evaluation"][dataset],
training/evaluation/retrieval.py) and copy-detection runs
(metrics["copy_detection"][dataset]). A measure the candidate scores lower on,
or a set the active one was measured on and the candidate was not, is a
reason to confirm.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.models import Activation, ModelVersion

# (section, key, words): higher is better for each.
MEASURES = [
    ("evaluation", "precision_at_k", "P@k"),
    ("evaluation", "map_at_k", "mAP@k"),
    ("evaluation", "marks_precision_at_k", "P@k on held-out marks"),
    ("copy_detection", "recall_at_1", "copy detection R@1"),
]


@dataclass
class Line:
    """One measure on one set: the active version's value, the candidate's (None: not measured)."""

    dataset: str
    measure: str
    active: float | None
    candidate: float | None

    @property
    def worse(self) -> bool:
        return self.active is not None and (self.candidate is None or self.candidate < self.active)

    def describe(self) -> str:
        if self.candidate is None:
            return f"{self.measure} on {self.dataset}: not measured for the new version (active: {self.active:.3f})"
        return f"{self.measure} on {self.dataset} drops from {self.active:.3f} to {self.candidate:.3f}"


def _value(version: ModelVersion, section: str, dataset: str, key: str) -> float | None:
    entry = ((version.metrics or {}).get(section) or {}).get(dataset)
    if not isinstance(entry, dict):
        return None
    value = ((entry.get("summary") or {}).get("all") or {}).get(key) if section == "copy_detection" else entry.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def compare(candidate: ModelVersion, active: ModelVersion | None) -> list[Line]:
    """Every measure the active version has, per set, next to the candidate's;
    then the candidate's measures on sets the active one lacks. [] without an active version."""
    if active is None:
        return []
    lines = []
    for section, key, words in MEASURES:
        for dataset in sorted((active.metrics or {}).get(section) or {}):
            mine = _value(active, section, dataset, key)
            if mine is not None:
                lines.append(Line(dataset, words, mine, _value(candidate, section, dataset, key)))
    return lines


def can_switch_at_once(version: ModelVersion) -> bool:
    """Whether search can switch to `version` now: its HNSW index is ready and it
    has embedded every image. Both *Activate* and *Roll back* ask this; when it
    is False they start an activation job (search.embed_jobs.start_activation)."""
    from search import hnsw
    from search.indexing import missing_image_ids

    return hnsw.is_ready(version) and not missing_image_ids(None, version)


def previous_version() -> ModelVersion | None:
    """The version that was active before the last activation, when it still
    exists and is not the active one (the target of *Roll back*)."""
    last = Activation.objects.select_related("previous").first()
    if last is None or last.previous is None or last.previous.is_active:
        return None
    return last.previous
