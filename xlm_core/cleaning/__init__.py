"""Library pieces of the clean stage, knowing nothing of DVC or params.yaml.

``decode`` turns a raw ``id<TAB>text`` line into its id and text or the reason it is dropped; ``filters`` holds the
per-segment and pair filters as objects (each named by the key it counts under in metrics/clean.json); ``dedup`` the
exact de-duplication state; ``split`` the id-keyed train/valid/test split; ``scratch`` the Parquet and sqlite files
the stage's units hand each other. ``pipeline.cleaning`` builds them from the clean params and runs the stage.
"""
