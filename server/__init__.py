"""modegpt serving: an in-process engine and an OpenAI-compatible API hosting several models."""
