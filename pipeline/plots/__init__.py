"""The page of `dvc plots show` (page.html) and the tool that vendors Vega into it (vendor.py)."""
