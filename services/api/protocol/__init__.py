"""Request and response schemas: ``openai`` (OpenAI API field order, extras marked) and ``legacy``
(the official TeleChat service, docs/legacy-api.md)."""
