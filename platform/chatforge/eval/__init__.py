"""Evaluation: how good a model is on held-out data, how it answers, and whether it may replace its baseline.

perplexity   held-out perplexity with training's masks
prompts      the prompt set and the bias probes (shipped under prompts/)
generate     answers generated and scored on a Ray actor pool
metrics      toxicity rate, refusal rate, bias gaps
attribution  gradient x input saliency of the prompt for the explained samples
gate         the promotion gate against a baseline
report       report.html
run          `run_evaluation`, which does all of the above and writes OUTPUT/
"""
