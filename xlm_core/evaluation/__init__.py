"""Scoring a trained encoder on held-out data, on top of the metric functions of ``xlm_core.metrics``.

    inputs    the test data one model is scored on (``EvalPlan``): test-split bitexts, user suites as token ids
    scoring   every figure of one model (``score_model``) and the unigram floor, as pure functions of the plan

The evaluate stage (pipeline/evaluate.py) builds the plan from params.yaml and writes the figures out.
"""
