"""datahall's AI gateway: an OpenAI-compatible, AI-aware load balancer with ORCA ingestion,
prefix-aware routing, a semantic cache and prompt transforms (``../shared/papers/ai-gateway.md``).
Work in progress (issue 6); the system's status stays ``planned`` until it is complete."""
