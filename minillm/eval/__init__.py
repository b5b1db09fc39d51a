"""Measurements of trained and imported models, and their reports.

Importing the package imports every module that registers a measurement, in the report's order (sections,
figures, results.json), so that minillm.eval.measurement.MEASUREMENTS holds them all.
"""

from minillm.eval import perplexity, longppl, tasks, tail, passkey, ruler, theory  # noqa: F401  (in this order)
