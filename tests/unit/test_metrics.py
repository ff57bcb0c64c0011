"""A worker's metric increments are held in memory and written to the multiprocess files
together (service.metrics.PendingWrites): the sums are the same, the writes fewer."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, Counter, Gauge, values
from prometheus_client.mmap_dict import MmapedDict

from service.metrics import PendingWrites, buffered_value_class


def on_disk(folder) -> dict[str, float]:
    found = {}
    for path in folder.glob("*.db"):
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            found[json.loads(key)[1]] = value
    return found


def test_increments_reach_the_files_when_flushed_and_add_up(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    pending = PendingWrites()
    monkeypatch.setattr(values, "ValueClass", buffered_value_class(pending))
    registry = CollectorRegistry()
    requests = Counter("t_requests", "requests", registry=registry)
    in_flight = Gauge("t_in_flight", "in flight", registry=registry, multiprocess_mode="livesum")
    for _ in range(3):
        in_flight.inc()
        requests.inc()
        in_flight.dec()
    assert requests._value.get() == 3, "this worker reads its own pending increments"
    assert on_disk(tmp_path).get("t_requests_total", 0.0) == 0.0, "nothing written yet"
    pending.flush()
    assert on_disk(tmp_path)["t_requests_total"] == 3.0
    assert on_disk(tmp_path).get("t_in_flight", 0.0) == 0.0
    requests.inc(2)
    in_flight.set(5)  # a set is written at once
    assert on_disk(tmp_path)["t_in_flight"] == 5.0
    pending.flush()
    assert on_disk(tmp_path)["t_requests_total"] == 5.0
    # A second buffered class builds on the same multiprocess class, not a second map of the files.
    again = buffered_value_class(PendingWrites())
    assert again.unbuffered is values.ValueClass.unbuffered
