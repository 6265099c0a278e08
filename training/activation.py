"""The activation gate: before search switches to another model version, its
measured quality next to the active one's on the same sets, and what gets
worse; and rolling back to the version active before.

The sets are the active version's evaluations (metrics["evaluation"][dataset],
training/evaluation/retrieval.py) and copy-detection runs
(metrics["copy_detection"][dataset]). Only sets the active version was
measured on are listed (the candidate's other sets are not compared: there is
nothing to compare them with), and a value is compared only with a value
measured the same way: the same k and the same `against` (what was searched)
for P@k and mAP@k, and for P@k on held-out marks also the same held-out marks
(`marks_set`, a digest of them, or else their count `marks_held_out`).
Otherwise the line says "not comparable" and why. A measure the candidate
scores lower on, a set the active one was measured on and the candidate was
not, or one measured differently is a reason to confirm.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.models import Activation, ModelVersion

# (section, key, words, what must match for two values to be compared): higher is better for each.
MEASURES = [
    ("evaluation", "precision_at_k", "P@k", ("k", "against")),
    ("evaluation", "map_at_k", "mAP@k", ("k", "against")),
    ("evaluation", "marks_precision_at_k", "P@k on held-out marks", ("k", "marks")),
    ("copy_detection", "recall_at_1", "copy detection R@1", ()),
]


@dataclass
class Line:
    """One measure on one set: the active version's value, the candidate's (None: not measured)."""

    dataset: str
    measure: str
    active: float | None
    candidate: float | None
    not_comparable: str = ""  # why the two were measured differently ("k 10 vs 5"); "" when alike

    @property
    def worse(self) -> bool:
        return self.active is not None and (self.candidate is None or bool(self.not_comparable)
                                            or self.candidate < self.active)

    def describe(self) -> str:
        if self.not_comparable and self.candidate is not None:
            return (f"{self.measure} on {self.dataset}: not comparable ({self.not_comparable}; "
                    f"active {self.active:.3f}, new {self.candidate:.3f})")
        if self.candidate is None:
            return f"{self.measure} on {self.dataset}: not measured for the new version (active: {self.active:.3f})"
        return f"{self.measure} on {self.dataset} drops from {self.active:.3f} to {self.candidate:.3f}"


def _value(version: ModelVersion, section: str, dataset: str, key: str) -> float | None:
    entry = ((version.metrics or {}).get(section) or {}).get(dataset)
    if not isinstance(entry, dict):
        return None
    value = ((entry.get("summary") or {}).get("all") or {}).get(key) if section == "copy_detection" else entry.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _conditions(version: ModelVersion, section: str, dataset: str, names: tuple[str, ...]) -> dict[str, object]:
    """How `version` measured `dataset`: the values that must match (see MEASURES)."""
    entry = ((version.metrics or {}).get(section) or {}).get(dataset)
    entry = entry if isinstance(entry, dict) else {}
    found: dict[str, object] = {}
    for name in names:
        if name == "marks":
            # The held-out marks: their digest when recorded, else how many there were.
            found[name] = entry.get("marks_set") or entry.get("marks_held_out")
        else:
            found[name] = entry.get(name)
    return found


def _difference(active: dict[str, object], candidate: dict[str, object]) -> str:
    words = {"k": "k", "against": "searched", "marks": "held-out marks"}
    return "; ".join(f"{words[name]} {active[name]} vs {candidate[name]}" for name in active
                     if active[name] != candidate[name])


def compare(candidate: ModelVersion, active: ModelVersion | None) -> list[Line]:
    """Every measure the active version has, per set it was measured on, next
    to the candidate's on that set (None: not measured), marked not comparable
    when the two were measured differently (MEASURES). Sets only the candidate
    was measured on are not listed. [] without an active version."""
    if active is None:
        return []
    lines = []
    for section, key, words, names in MEASURES:
        for dataset in sorted((active.metrics or {}).get(section) or {}):
            mine = _value(active, section, dataset, key)
            if mine is None:
                continue
            theirs = _value(candidate, section, dataset, key)
            differs = "" if theirs is None else _difference(_conditions(active, section, dataset, names),
                                                            _conditions(candidate, section, dataset, names))
            lines.append(Line(dataset, words, mine, theirs, differs))
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
