"""TWIST: model, projection head, loss, and the self-labeling / momentum-encoder objectives."""
