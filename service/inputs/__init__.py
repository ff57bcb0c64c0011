"""What a request's rows are, shared by the protocols and the models.

- `parsing.py`: strict JSON, rows of numbers, bounded batches.
- `columns.py`: named, typed input columns: cells checked into typed rows, the DataFrame a
  model predicts from, a typed row's cache-key bytes.
"""
