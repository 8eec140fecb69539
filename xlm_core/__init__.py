"""xlm_core: the library every pipeline stage shares (model, objectives, data, checkpoints)."""
