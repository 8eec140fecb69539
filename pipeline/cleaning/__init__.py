"""The clean stage's steps (``pipeline.clean`` runs them): ``plan`` checks data/raw against params and lists the
work, ``filters`` builds the filter objects from the clean params, ``segments`` is step 1 (a raw file), ``dedup``
step 2 (a language), ``mono`` step 3 (the mono splits, the leak check and decontamination), ``pairs`` step 4 (the
pair joins), ``eval_suites`` the suites of the ``role: eval`` sources, and ``counts`` turns what every step counted
into metrics/clean.json. The library pieces (decoding, filters, dedup state,
the split, scratch files) are in ``xlm_core.cleaning``.
"""
