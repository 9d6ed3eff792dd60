"""datahall's AI gateway: an OpenAI-compatible, AI-aware load balancer in front of an inference
fleet, with ORCA load ingestion, prefix- and load-aware routing, a semantic cache and prompt
transforms. There is no paper: the composition is our reconstruction of what the Azure AI
networking keynote describes (brief ``ai-gateway.md``). See docs/gateway.md.

The server is :func:`datahall.gateway.server.create_app` over a config from
:func:`datahall.gateway.config.load_config`; the pieces live in modules named after their
concepts: ``orca``, ``wrr``, ``prefix``, ``routing``, ``resilience``, ``semcache``, ``embed``,
``transform``, ``ratelimit``, and ``simulate`` (simulated model servers for tests and
benchmarks).
"""
