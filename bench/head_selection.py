"""Which epoch to keep when training a head: validation loss against validation P@10.

    .venv/bin/python bench/head_selection.py --dataset fashion --cache var/weights/features/<file>.pt
        [--configs mlp:256:1e-3,linear:256:1e-3] [--epochs 10] [--threads 2]

An offline probe on a head-only run's feature cache (training/core/features.py:
ids, content hashes, (N, D) float32 backbone features). For each head
configuration (kind:dimension:learning rate, optionally :weight decay) it
trains a ProjectionHead (training/core/networks/head.py) with the objective
head-only training uses by default (training.core.objectives.get_objective(name).build
"normalized_softmax": pytorch-metric-learning's NormalizedSoftmaxLoss) on
the train split's cached features (Adam, batches of 256, seed 0), and after every
epoch prints the validation loss and the validation P@10 (each validation
image a query against the train images, exact cosine in torch, training.core.head_training.feature_precision_at_k, what
`train --select-by val_precision_at_10` computes). It answers
one question: does the epoch with the lowest validation loss (what `train`
keeps, the study's protocol) have the best retrieval? The test split is not
read. Nothing is written.
"""

from __future__ import annotations

import argparse
import sys
import time

from _common import setup_django


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--cache", required=True, help="a feature cache file under CBIR_WEIGHTS_DIR/features/")
    parser.add_argument("--configs", default="mlp:256:1e-3,linear:256:1e-3,mlp:256:3e-4,mlp:256:1e-3:1e-4")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_django()
    import torch

    from search.models import Image
    from training.core.head_training import feature_precision_at_k
    from training.core.networks.head import ProjectionHead
    from training.core.objectives import get_objective

    torch.set_num_threads(args.threads)
    data = torch.load(args.cache, map_location="cpu", weights_only=True)
    ids, features = data["ids"].tolist(), data["features"].float()
    meta = {pk: (label, split) for pk, label, split in
            Image.objects.filter(dataset__name=args.dataset, pk__in=ids).values_list("pk", "label", "split")}
    keep = [i for i, pk in enumerate(ids) if pk in meta and meta[pk][0] and meta[pk][1] in ("train", "val")]
    if not keep:
        raise SystemExit(f"no labelled train/val image of dataset {args.dataset!r} in {args.cache}")
    classes = sorted({meta[ids[i]][0] for i in keep})
    labels = torch.tensor([classes.index(meta[ids[i]][0]) for i in keep])
    is_train = torch.tensor([meta[ids[i]][1] == "train" for i in keep])
    x = features[keep]
    x_train, y_train, x_val, y_val = x[is_train], labels[is_train], x[~is_train], labels[~is_train]
    print(f"{args.dataset}: {len(x_train):,} train and {len(x_val):,} validation features of {x.shape[1]} dimensions, "
          f"{len(classes)} classes; frozen validation P@10 {feature_precision_at_k(x_val, y_val, x_train, y_train):.4f}")
    for spec in args.configs.split(","):
        kind, dimension, lr, *rest = spec.split(":")
        weight_decay = float(rest[0]) if rest else 0.0
        torch.manual_seed(0)
        head = ProjectionHead(x.shape[1], int(dimension), kind)
        objective = get_objective("normalized_softmax").build(head, len(classes))
        optimizer = torch.optim.Adam(list(head.parameters()) + list(objective.parameters()), lr=float(lr),
                                     weight_decay=weight_decay)
        cpu = torch.device("cpu")
        curve, started = [], time.perf_counter()
        for epoch in range(1, args.epochs + 1):
            head.train()
            order = torch.randperm(len(x_train))
            for lo in range(0, len(order), 256):
                batch = order[lo:lo + 256]
                optimizer.zero_grad()
                objective(head, (x_train[batch], y_train[batch]), cpu).backward()
                optimizer.step()
            head.eval()
            with torch.no_grad():
                val_loss = sum(objective(head, (x_val[lo:lo + 256], y_val[lo:lo + 256]), cpu).item()
                               * len(y_val[lo:lo + 256]) for lo in range(0, len(y_val), 256)) / len(y_val)
                p10 = feature_precision_at_k(head(x_val), y_val, head(x_train), y_train)
            curve.append((epoch, val_loss, p10))
        by_loss = min(curve, key=lambda c: c[1])
        by_p10 = max(curve, key=lambda c: c[2])
        print(f"\n{spec} ({time.perf_counter() - started:.0f} s): lowest validation loss at epoch {by_loss[0]} "
              f"(P@10 {by_loss[2]:.4f}); best validation P@10 {by_p10[2]:.4f} at epoch {by_p10[0]}")
        print("  epoch  val loss  val P@10")
        for epoch, val_loss, p10 in curve:
            print(f"  {epoch:5d}  {val_loss:8.4f}  {p10:8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
