"""Evaluation protocols (linear, semi, kNN, cluster), the features they share, metrics, label subsets."""
