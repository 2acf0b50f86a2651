"""Serving on Ray Serve: an OpenAI-compatible API (``app.build_app``) over a continuous-batching engine, with A/B
variants, a toxicity guard, API keys, a feedback store and metrics. See docs/serving.md."""
