"""TeleChat HTTP API: OpenAI-compatible and legacy TeleChat routes over the continuous-batching engine.

Start it with ``telechat serve`` or ``python -m services.api``; ``create_app`` (in ``main``) builds
the ASGI app for tests and embedding.
"""
