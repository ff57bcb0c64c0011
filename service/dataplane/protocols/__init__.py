"""One module per protocol, each a pair of pure functions: decode (bytes → a validated
request) and encode (results → bytes). No Flask here; the REST layer only routes.

    body      content types and compressed request bodies, shared by every route
    v1        KServe V1 / TF-Serving: {"instances": [[...]]} → {"predictions": [...]}
    shortcut  the tutorials' /predict: {"features": [...]} or {"instances": [[...]]}
    v2        the Open Inference Protocol, JSON tensors and Triton's binary tensor data
"""
