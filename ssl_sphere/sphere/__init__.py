"""The hypersphere regularisers (SEC, SEE, vMF) and embedding statistics: pure functions of tensors
plus small modules holding their state (SEC's running mean norm, vMF's means and pseudo-labels)."""
