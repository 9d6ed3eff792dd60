"""KrakenGuard (NSDI '26): load-time policy checking of eBPF programs by symbolic execution."""
