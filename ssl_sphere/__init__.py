"""ssl_sphere: self-supervised contrastive pretraining on the hypersphere."""

__version__ = "0.1.0"
