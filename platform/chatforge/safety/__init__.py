"""Safety: the toxicity scorers curation, the serving guard and evaluation share, and the labeled set they are
measured on.

`scorers` holds the `Scorer` protocol, `build_scorer` and the `profanity` and `detoxify` backends; `profanity_model`
reads the profanity model shipped beside it as plain arrays; `targeted` is the offline default scorer (the
profanity model, counted where it is aimed at the addressee, plus slurs, threats and wishes of harm); `evalset`
builds the labeled template set that `benchmarks/toxicity.py` and the unit tests measure every scorer on.
"""
