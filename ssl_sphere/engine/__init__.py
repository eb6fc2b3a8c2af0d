"""The engine: the training run (train.py) with its setup object, step (step.py), policy (when to log,
evaluate, save and stop), checkpoint state, run directory, stop signals, logs and optimiser. The only
layer that knows DDP, AMP, logging and checkpoints."""
