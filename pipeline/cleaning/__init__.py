"""The clean stage's steps (``pipeline.clean`` runs them): ``plan`` checks data/raw against params and lists the
work, ``filters`` builds the filter objects from the clean params, ``segments`` is step 1 (a raw file), ``dedup``
step 2 (a language), ``mono`` step 3 (the mono splits and the leak check), ``pairs`` step 4 (the pair joins), and
``counts`` turns what every step counted into metrics/clean.json. The library pieces (decoding, filters, dedup state,
the split, scratch files) are in ``xlm_core.cleaning``.
"""
