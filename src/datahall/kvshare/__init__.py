"""DroidSpeak (NSDI '26): KV-cache reuse across fine-tuned variants of one base LLM.

A receiver variant reuses a sender variant's KV cache for most layers and recomputes one
contiguous group of critical layers with its own weights, starting from the sender's hidden
state at the group's first layer (the E cache). See docs/kvshare.md.
"""
