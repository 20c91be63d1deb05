"""The OpenAI-compatible HTTP server (FastAPI): protocol, auth, errors, SSE, metrics."""
