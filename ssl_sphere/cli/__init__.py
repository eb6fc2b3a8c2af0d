"""The commands: pretrain, knn, linear, export (``python -m ssl_sphere.<command>``, console scripts
``ssl-sphere-<command>``), and what they share (common: the one error path, the evaluation flags)."""
