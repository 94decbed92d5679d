"""Text -> vectors: local model packages (and, in the adapters issue, OpenAI-compatible HTTP)."""
