"""A local multi-node Ray cluster on one machine (``python -m cluster.local --help``)."""
