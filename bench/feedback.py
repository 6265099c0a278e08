"""Relevance feedback with a simulated user: P@10 before and after one Rocchio refinement.

    .venv/bin/python bench/feedback.py [--limit 10000] [--queries 1000] [--arch efficientnet_lite0]
        [--images .../t10k-images-idx3-ubyte.gz --labels .../t10k-labels-idx1-ubyte.gz] [--threads 2]
        [--cache var/bench/feedback-<arch>-<limit>.npy] [--head-epochs 30]

The first `--limit` images of a labelled MNIST-style IDX pair (default
Fashion-MNIST's 10,000 test images, Debian's dataset-fashion-mnist) are
embedded with the default architecture's pretrained weights (what a fresh
install searches with; grey images converted to RGB as the import does),
cached in a .npy file for reruns. Then, for `--queries` random images as
queries against all the others (exact cosine search in numpy: the question is
what feedback adds, not the index's recall, docs/scaling.md has that):

1. the simulated user marks the top 10: right when the label matches the
   query's, wrong otherwise;
2. one refinement: the query moved by search.rocchio.rocchio (α = 1,
   β = 0.75, γ = 0.15), searched again with the wrong ones left out, as
   /api/search with positive= and negative= does;
3. P@10 (label match, denominator 10) before and after, on the full ranking,
   and on the residual collection (the 10 judged images left out of both:
   ranks 11-20 before against the refined top 10 of the unjudged), the fair
   comparison in the feedback literature, since the full ranking rewards
   showing the positives again.

Then a head trained on the simulated marks alone (no labels;
training.core.mark_training.train_head_on_marks, ContrastiveLoss on the
marked pairs) against the frozen backbone, on held-out marks: half the
queries' marks train (the top-10 marks and those of the refined top 10), the
other half's are held out, measured with marks_precision_at_k (condensed
list) and with label P@10 of those held-out queries. Nothing is written
but the cache file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default=str(FASHION / "t10k-images-idx3-ubyte.gz"))
    parser.add_argument("--labels", default=str(FASHION / "t10k-labels-idx1-ubyte.gz"))
    parser.add_argument("--limit", type=int, default=10_000, help="the first N images (0: all)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cache", default=None, help="embeddings .npy (default var/bench/feedback-<arch>-<N>.npy)")
    parser.add_argument("--head-epochs", type=int, default=30, help="0: skip the head trained on marks")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def embed(images: np.ndarray, arch: str, batch: int) -> np.ndarray:
    """(N, rows, cols) uint8 grey images → (N, D) float32 unit vectors, with
    the architecture's pretrained network and its own preprocessing."""
    import torch
    from PIL import Image

    from training.core.inference import embed_batch
    from training.core.networks.registry import build_network

    model = build_network(arch, weights="pretrained").eval()
    device = torch.device("cpu")
    out, started = [], time.perf_counter()
    for lo in range(0, len(images), batch):
        tensors = torch.stack([model.preprocessing(Image.fromarray(a, "L").convert("RGB"))
                               for a in images[lo:lo + batch]])
        out.append(embed_batch(model, device, tensors))
        done = min(lo + batch, len(images))
        if done == len(images) or (lo // batch) % 20 == 0:
            print(f"  embedded {done:,}/{len(images):,} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return np.concatenate(out).astype(np.float32)


def top(vectors: np.ndarray, query: np.ndarray, k: int, leave_out) -> np.ndarray:
    """Row indices of the k most cosine-similar unit vectors, `leave_out` excluded (ties by index)."""
    scores = vectors @ query
    scores[list(leave_out)] = -np.inf
    best = np.argpartition(-scores, k)[:k]
    return best[np.lexsort((best, -scores[best]))]


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    from search.idx import read_images_and_labels
    from search.rocchio import rocchio

    torch.set_num_threads(args.threads)
    images, labels = read_images_and_labels(args.images, args.labels)
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    n = len(images)
    cache = Path(args.cache or REPO / "var" / "bench" / f"feedback-{args.arch}-{n}.npy")
    if cache.exists():
        vectors = np.load(cache)
        print(f"embeddings from {cache}")
    else:
        print(f"embedding {n:,} images with {args.arch} (pretrained) on {args.threads} thread(s)…")
        started = time.perf_counter()
        vectors = embed(images, args.arch, args.batch)
        print(f"  {time.perf_counter() - started:.0f} s")
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, vectors)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rng = np.random.default_rng(args.seed)
    queries = rng.choice(n, size=min(args.queries, n), replace=False)
    k = 10
    before, after, residual_before, residual_after = [], [], [], []
    marks: dict[int, list[tuple[int, bool]]] = {}
    for q in queries:
        first = top(vectors, vectors[q], 2 * k, {q})
        shown = first[:k]
        right = [int(i) for i in shown if labels[i] == labels[q]]
        wrong = [int(i) for i in shown if labels[i] != labels[q]]
        moved = rocchio(vectors[q], vectors[right] if right else np.zeros((0, vectors.shape[1])),
                        vectors[wrong] if wrong else np.zeros((0, vectors.shape[1])))
        refined = top(vectors, moved, k, {q, *wrong})
        unjudged = top(vectors, moved, k, {q, *shown.tolist()})
        before.append(len(right) / k)
        after.append(float(np.mean(labels[refined] == labels[q])))
        residual_before.append(float(np.mean(labels[first[k:]] == labels[q])))
        residual_after.append(float(np.mean(labels[unjudged] == labels[q])))
        judged = {int(i): bool(labels[i] == labels[q]) for i in [*shown, *refined]}
        marks[int(q)] = list(judged.items())

    def line(name, a, b):
        a, b = np.asarray(a), np.asarray(b)
        delta = b - a
        print(f"  {name:<34} {a.mean():.4f} → {b.mean():.4f}  ({delta.mean():+.4f}, 95% CI ±"
              f"{1.96 * delta.std(ddof=1) / np.sqrt(len(delta)):.4f})")

    print(f"{n:,} images ({len(set(labels.tolist()))} classes), {len(queries):,} queries, {args.arch} "
          f"{vectors.shape[1]}-d; P@10 before → after one Rocchio refinement (α=1, β=0.75, γ=0.15):")
    line("full ranking (positives shown again)", before, after)
    line("residual collection (judged left out)", residual_before, residual_after)
    if args.head_epochs:
        head_on_marks(args, vectors, labels, queries, marks)
    return 0


def head_on_marks(args, vectors: np.ndarray, labels: np.ndarray, queries: np.ndarray, marks: dict) -> None:
    """A head trained on half the queries' simulated marks (no labels) against
    the frozen backbone, on the other half's held-out marks."""
    import torch

    from training.core.head_training import feature_precision_at_k
    from training.core.mark_training import MarkTrainingConfig, marks_precision_at_k, train_head_on_marks

    half = len(queries) // 2
    train_q, held_q = queries[:half], queries[half:]
    held_set = {int(q) for q in held_q}
    train_marks = [(int(q), r, ok) for q in train_q for r, ok in marks[int(q)] if r not in held_set]
    held_marks = [(int(q), r, ok) for q in held_q for r, ok in marks[int(q)]]
    x = torch.from_numpy(vectors)
    started = time.perf_counter()
    head, history = train_head_on_marks(x, train_marks, MarkTrainingConfig(epochs=args.head_epochs, seed=args.seed))
    seconds = time.perf_counter() - started
    with torch.no_grad():
        projected = torch.cat([head(x[lo:lo + 4096]) for lo in range(0, len(x), 4096)])
    y = torch.from_numpy(labels.astype(np.int64))
    held = torch.from_numpy(held_q.astype(np.int64))
    others = torch.ones(len(x), dtype=torch.bool)
    others[held] = False

    def label_p10(e: torch.Tensor) -> float:
        return feature_precision_at_k(e[held], y[held], e[others], y[others])

    frozen_marks, counted = marks_precision_at_k(x, x, held_marks)
    head_marks, _ = marks_precision_at_k(projected, projected, held_marks)
    print(f"head trained on simulated marks alone (no labels): {len(train_marks):,} marks of {half:,} queries, "
          f"linear 256-d, ContrastiveLoss, {args.head_epochs} epochs in {seconds:.1f} s (loss {history[0]['train_loss']:.4f} → "
          f"{history[-1]['train_loss']:.4f}); held out: {len(held_marks):,} marks of {len(held_q):,} queries")
    print(f"  P@10 on held-out marks (condensed, {counted:,} queries)  frozen {frozen_marks:.4f}  head "
          f"{head_marks:.4f}  ({head_marks - frozen_marks:+.4f})")
    print(f"  label P@10 of the held-out queries (against the rest)  frozen {label_p10(x):.4f}  head "
          f"{label_p10(projected):.4f}")


if __name__ == "__main__":
    raise SystemExit(main())
