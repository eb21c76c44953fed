"""The stateless OpenAI-compatible HTTP servers that talk to the engine over ZeroMQ."""
