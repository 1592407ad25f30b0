"""Self-Classifier: model, loss, nearest-neighbour queue."""
