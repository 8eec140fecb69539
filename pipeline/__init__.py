"""pipeline: one module per DVC stage (a pure function plus a thin CLI), and the Prefect flow over dvc.yaml."""
