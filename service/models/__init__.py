"""What a worker serves: model versions, from their folders to the desired state.

- `registry.py`: the versions this worker serves and the version a request gets.
- `artifacts.py`: one version's folder checked (model.json, sha256) and loaded.
- `serving.py`: the serving policy per version (cache, batching): settings > model.json.
- `lifecycle.py`: the desired state and its rules, pure (records, trust, plans).
- `convergence.py`: the desired state's record in Redis and the converger loop.
- `packaging.py`: `scripts/cluster model add` (not used by a running replica).
"""
