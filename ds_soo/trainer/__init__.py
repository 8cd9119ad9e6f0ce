"""The trainer behind ``python -m ds_soo.train``: config, engine boundary, loop, reports, compare mode."""
