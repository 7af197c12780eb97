"""The OpenAI-compatible HTTP server and its chat page (the `serve` extra: starlette, uvicorn, sse-starlette, prometheus-client)."""
