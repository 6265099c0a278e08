"""The ML core: networks, preprocessing, losses, samplers, the epoch loop, the
trainer, head training, distributed training and inference.

It imports neither Django nor `search`: it reads image rows as plain tuples
(training/rows.py builds them from the database) and its few settings through
training.core.runtime. tests/test_layers.py checks this on the source."""
