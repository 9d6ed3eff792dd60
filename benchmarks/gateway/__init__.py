"""Benchmarks of the AI gateway (issue 6, item 9): overhead against direct access, routing
policies on a shared-prefix workload over unequal simulated backends, and the semantic cache's
hit and false-hit rates. ``python -m benchmarks gateway`` runs them all."""
