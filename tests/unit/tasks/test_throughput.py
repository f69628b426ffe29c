from mmclip.tasks import throughput
from mmclip.tasks.throughput import Throughput


def test_rate_is_samples_over_the_window(monkeypatch):
    clock = iter([10.0, 12.0, 14.0, 15.0, 16.5])
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    meter = Throughput(window=5.0)
    assert meter.update(100) is None  # t=10: starts the clock, the first step's samples are not counted
    assert meter.update(20) is None  # t=12
    assert meter.update(30) is None  # t=14
    assert meter.update(50) == 100 / 5.0  # t=15: 20 + 30 + 50 samples over 5 s, window restarts
    assert meter.update(7) is None  # t=16.5: a new window
