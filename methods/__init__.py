"""Self-supervised methods: each supplies its model (backbone + head), its loss and its per-step hooks;
`methods.registry` maps `cfg.method` to them."""
