"""Data: datasets as uint8 tensors (splits, datasets), image folders (listing, decode) and their
decoded-image cache, the batch order (batches) and the host-side prefetcher (loader). No CPU
augmentation: images reach the training step as uint8 and are augmented on its device."""
