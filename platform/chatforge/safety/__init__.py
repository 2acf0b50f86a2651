"""Safety: scorers shared by curation, the serving guard and evaluation, and the labeled set they are measured on.

`targeted` is the offline default toxicity scorer (the profanity model, counted where it is aimed at the
addressee, plus slurs, threats and wishes of harm); `evalset` builds the labeled template set that
`benchmarks/toxicity.py` and the unit tests measure every scorer on.
"""
