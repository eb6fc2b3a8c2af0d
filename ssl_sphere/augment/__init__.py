"""Augmentation on the training device: batched ops with per-sample parameters drawn as torchvision
draws them (ops), and the Augmenter that turns a uint8 batch into the training views (views)."""
