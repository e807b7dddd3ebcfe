"""Test fixtures, not product: tiny random-weight diffusers pipelines built offline (:mod:`guidekit.testing.tiny`).

They serve guidekit's tests, benchmarks and dry runs, and the ``tiny:FAMILY`` model names of the command line and
the demo, which exist to try guidekit without downloading a model. Their images are noise: the weights are random.
"""
