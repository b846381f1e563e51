"""The services' ``telechat`` sub-commands (registered as ``telechat.commands`` entry points)."""

from telechat.commands import Command

SERVE = Command("services.api.main:main", "start the HTTP API (OpenAI-compatible + legacy TeleChat routes)", 20)
WEB = Command("services.web.launch:main", "start the Streamlit chat UI", 21)
