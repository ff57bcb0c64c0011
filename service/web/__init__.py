"""The web side: the two doors of a replica and what they share.

- `fastlane.py`: WSGI middleware; prediction POSTs straight from the environ (and the L1's
  304 revalidation), no Flask.
- `http.py`: the Flask door's plumbing (hooks, error handlers, the `model` converter).
- `views.py`: Flask views of health, metrics, OpenAPI, V1/V2 metadata and predictions.
- `operator.py`: Flask views of the model repository (the operator's routes).
- `envelope.py`: what every request gets by either door (request id, JSON errors, metrics).
- `routes.py`: the route table Flask, the fast lane, `openapi.py` and nginx's L1 follow.

Imports the data plane and below; nothing below imports this room.
"""
