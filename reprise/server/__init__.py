"""The OpenAI-compatible HTTP server: `app.create_app(async_engine)` builds it, `serve.serve(config)` runs it."""
