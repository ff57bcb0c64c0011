"""Redis and the result cache.

- `client.py`: one Redis client for any topology (one server, Sentinel, Cluster).
- `results.py`: the result cache per row (keys, one MGET, one pipelined SET).
- `breaker.py`: the circuit breaker a failing Redis opens.
- `fanout.py`: a Redis Cluster's nodes asked in parallel within one time budget.
"""
