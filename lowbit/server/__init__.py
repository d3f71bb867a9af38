"""The OpenAI-compatible HTTP server (`lowbit serve`)."""
