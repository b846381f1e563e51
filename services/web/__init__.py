"""TeleChat web chat (Streamlit). Talks to the API over HTTP only: nothing here imports torch."""
