"""The data plane: one prediction, with no transport.

- `contract.py`: what a door hands in (`Call`) and gets back (`Answer`).
- `handlers.py`: per route: model and version, decode, predict, encode, the L1 headers;
  V2 model metadata and Triton's model config.
- `protocols/`: the wire formats (KServe V1, Open Inference Protocol JSON and binary
  tensors, `/predict`, bodies: content type and gzip).
- `predictor.py`: the result cache per row, batching, the predict call.
- `batching.py`: concurrent requests of one worker sharing one predict call.
- `compute.py`: where a predict runs: an expensive one in the worker's compute thread, so
  the loop goes on reading, refusing and answering requests meanwhile.
- `admission.py`: the worker's queue discipline: a prediction that waited too long in a
  standing queue is refused before its body is read; a passed deadline is not computed.
- `state.py`: what one app holds (settings, registry, predictor, cache, metrics, admission).
"""
