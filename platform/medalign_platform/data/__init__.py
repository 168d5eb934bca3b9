"""Datasets as the student sees them: the conversation loader, the ``data`` section and its splits,
the collator (one prompt format for training and evaluation) and the evaluation metrics."""
