"""Placing a request where its prefix probably sits in KV cache: the router across its workers
(services/router/policies/cache_aware.py) and DP attention's rank 0 across its ranks
(shared/distributed/dp_engine.py), with one approximate tree and one rule."""
