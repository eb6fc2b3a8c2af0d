"""The bottom layer every other layer may use: user errors, DDP helpers, the checkpoint file, schedules."""
