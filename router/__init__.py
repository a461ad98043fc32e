"""The DvD gateway: an OpenAI-compatible HTTP front for a pool of language servers (see docs/ARCHITECTURE.md)."""
