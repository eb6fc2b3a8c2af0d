"""Evaluation: the protocols on feature tensors (kNN, linear probe, Recall@K, alignment / uniformity),
frozen-feature extraction, and the live kNN monitor that training runs."""
