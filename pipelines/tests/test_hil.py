"""The HIL measuring harness against a real Triton server from the wheel, with a tiny identity model."""

from __future__ import annotations

import math
import urllib.request

import pytest

from pipelines.hil import (
    STABLE,
    UNSTABLE,
    CpuSplit,
    HilError,
    InputSpec,
    Settings,
    Window,
    cpu_split,
    infer_body,
    measure,
    measure_point,
    percentile_ms,
    prepare,
    windows_agree,
)

pytestmark = pytest.mark.timeout(120)

IDENTITY_PY = '''import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())])
                for r in requests]
'''

# The identity, 50 ms a request: a slow engine.
SLOW_PY = IDENTITY_PY.replace("    def execute(self, requests):\n",
                              "    def execute(self, requests):\n        import time\n        time.sleep(0.05)\n")

IDENTITY_CONFIG = '''name: "{name}"
backend: "python"
max_batch_size: {max_batch}
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 4 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
'''


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    from pipelines.triton_local import TritonServer

    base = tmp_path_factory.mktemp("hil-triton")
    models = {"identity": 8, "identity_unbatched": 0, "slow": 8}  # name: max_batch_size (0: no batch axis)
    for name, max_batch in models.items():
        (base / "repo" / name / "1").mkdir(parents=True)
        (base / "repo" / name / "1" / "model.py").write_text(SLOW_PY if name == "slow" else IDENTITY_PY)
        (base / "repo" / name / "config.pbtxt").write_text(IDENTITY_CONFIG.format(name=name, max_batch=max_batch))
    server = TritonServer(base / "repo", base / "work")
    server.start()
    try:
        for name in models:
            load = urllib.request.Request(f"http://{server.url}/v2/repository/models/{name}/load", data=b"{}",
                                          method="POST")
            with urllib.request.urlopen(load, timeout=60) as resp:
                assert resp.status == 200
        yield server
    finally:
        server.stop()


def _window(rate: float, p50_ms: float) -> Window:
    """A one-second window of `rate` requests that all took `p50_ms`."""
    return Window(seconds=1.0, latencies_ns=[int(p50_ms * 1e6)] * int(rate), errors=0, batch_size=1, server={})


def test_percentiles_are_nearest_rank_in_ms():
    latencies = [i * 1_000_000 for i in range(1, 101)]  # 1..100 ms
    assert [percentile_ms(latencies, q) for q in (50, 90, 95, 99, 100)] == [50, 90, 95, 99, 100]
    assert percentile_ms([3_000_000], 99) == 3
    assert math.isnan(percentile_ms([], 50))


def test_windows_agree_only_when_throughput_and_p50_are_both_within_the_percentage():
    assert windows_agree([_window(100, 1.0), _window(105, 1.05), _window(109, 1.0)], 10)
    assert not windows_agree([_window(100, 1.0), _window(105, 1.0), _window(111, 1.0)], 10)  # throughput
    assert not windows_agree([_window(100, 1.0), _window(100, 1.2), _window(100, 1.0)], 10)  # p50
    assert not windows_agree([_window(0, 1.0), _window(0, 1.0), _window(0, 1.0)], 10)  # no request answered


def test_a_sweep_gives_every_point_ordered_percentiles_throughput_triton_times_and_memory(triton):
    # A stability percentage no noise can exceed: each point is stable after exactly three windows, which
    # keeps the test short and its verdicts deterministic; the rule itself is tested above and below.
    settings = Settings(concurrencies=(1, 2), window_s=0.4, stability_pct=1e9, max_trials=5, warmup_requests=10)
    result = measure(triton.url, "identity", server_pid=triton.proc.pid, settings=settings)

    assert result.max_batch_size == 8
    assert [(p.batch_size, p.concurrency) for p in result.points] == [(1, 1), (1, 2), (8, 1), (8, 2)]
    for p in result.points:
        assert (p.status, p.windows) == (STABLE, 3), p.words()
        assert 0 < p.p50_ms <= p.p90_ms <= p.p95_ms <= p.p99_ms, p.words()
        assert p.requests > 0 and p.requests_per_s > 0, p.words()
        assert p.inferences_per_s == pytest.approx(p.requests_per_s * p.batch_size)
        assert p.queue_ms is not None and p.queue_ms > 0, p.words()
        assert p.compute_ms is not None and p.compute_ms > 0, p.words()
        assert p.server_requests > 0 and p.errors == 0 and p.first_error is None, p.words()
        assert p.memory_pss_bytes > 0
        assert len(p.trials) == 3 and all(rate > 0 and p50 > 0 for rate, p50 in p.trials)
        assert 0 <= p.throughput_spread_pct < math.inf and 0 <= p.latency_spread_pct < math.inf
    assert result.memory_after_warmup_bytes > 0
    assert result.memory_pss_bytes >= max(p.memory_pss_bytes for p in result.points)
    words = result.words()
    assert "identity: 4 point(s)" in words and "0 unstable" in words
    assert "concurrency 2, batch 8: stable after 3 window(s)" in words


def test_the_server_memory_counts_the_python_backend_stubs(triton):
    import psutil

    from pipelines.hil import server_pss_bytes

    alone = psutil.Process(triton.proc.pid).memory_full_info().pss
    assert server_pss_bytes(triton.proc.pid) > alone > 0


def test_a_point_whose_windows_never_agree_ends_unstable_after_the_maximum_of_trials(triton):
    # No two windows of real traffic have throughputs equal to a billionth.
    settings = Settings(concurrencies=(1,), batch_sizes=(1,), window_s=0.2, stability_pct=1e-7, max_trials=4,
                        warmup_requests=2)
    result = measure(triton.url, "identity", [InputSpec("x", "FP32", (4,))], server_pid=triton.proc.pid,
                     settings=settings)

    [point] = result.points
    assert (point.status, point.windows) == (UNSTABLE, 4), point.words()
    assert point.requests > 0 and 0 < point.p50_ms <= point.p99_ms
    assert "1 unstable" in result.words() and "unstable after 4 window(s)" in point.words()
    assert len(point.trials) == 4 and point.throughput_spread_pct > 1e-7


def test_a_window_of_a_slow_engine_lasts_until_it_holds_enough_requests_to_count_on(triton):
    # 50 ms a request: a 0.2 s window alone would hold 4 requests, 25% apart for one more or less.
    settings = Settings(concurrencies=(1,), batch_sizes=(1,), window_s=0.2, min_window_requests=12, max_trials=4,
                        warmup_requests=2)
    target = prepare(triton.url, "slow", server_pid=triton.proc.pid, settings=settings)
    point = measure_point(target, 1, 1, settings)
    assert point.requests >= 3 * 12, point.words()  # the figures' three windows, each with at least 12
    assert all(rate < 25 for rate, _ in point.trials) and point.p50_ms >= 50


def test_a_model_without_a_batch_axis_is_measured_at_batch_one_only(triton):
    settings = Settings(concurrencies=(1,), window_s=0.2, stability_pct=1e9, warmup_requests=2)
    result = measure(triton.url, "identity_unbatched", server_pid=triton.proc.pid, settings=settings)

    assert result.max_batch_size == 0
    assert [(p.batch_size, p.status, p.errors) for p in result.points] == [(1, STABLE, 0)]


def test_two_models_can_be_measured_point_by_point_interleaved(triton):
    settings = Settings(window_s=0.2, stability_pct=1e9, warmup_requests=2, batch_sizes=(2,))
    targets = [prepare(triton.url, name, server_pid=triton.proc.pid, settings=settings)
               for name in ("identity", "identity_unbatched")]

    assert [t.batch_sizes for t in targets] == [[2], [1]]
    points = [measure_point(t, 2, t.batch_sizes[0], settings) for t in targets]
    assert [(p.concurrency, p.batch_size, p.status) for p in points] == [(2, 2, STABLE), (2, 1, STABLE)]
    assert points[0].inferences_per_s == pytest.approx(2 * points[0].requests_per_s)


def test_a_request_the_model_refuses_fails_the_warm_up_in_words(triton):
    with pytest.raises(HilError, match="warm-up of identity at batch 1: HTTP 400"):
        prepare(triton.url, "identity", [InputSpec("not_x", "FP32", (4,))], server_pid=triton.proc.pid,
                settings=Settings(batch_sizes=(1,), warmup_requests=1))
    with pytest.raises(HilError, match="none of the batch sizes"):
        prepare(triton.url, "identity", server_pid=triton.proc.pid, settings=Settings(batch_sizes=(16,)))


def test_a_point_whose_every_request_fails_counts_the_errors_and_is_never_stable(triton):
    settings = Settings(concurrencies=(1,), batch_sizes=(1,), window_s=0.2, stability_pct=1e9, max_trials=3,
                        warmup_requests=1)
    target = prepare(triton.url, "identity", server_pid=triton.proc.pid, settings=settings)
    body, head = infer_body([InputSpec("not_x", "FP32", (4,))], 1, batched=True)  # an input the model lacks
    target.requests[1] = (body, {**target.requests[1][1], "Inference-Header-Content-Length": str(head)})

    point = measure_point(target, 1, 1, settings)
    assert (point.status, point.windows, point.requests) == (UNSTABLE, 3, 0), point.words()
    assert point.errors > 0 and point.first_error is not None and point.first_error.startswith("HTTP 400")
    assert math.isnan(point.p50_ms) and point.queue_ms is None and point.requests_per_s == 0
    assert "error(s), the first: HTTP 400" in point.words()


def test_the_cpus_are_split_between_the_server_and_the_load_clients():
    assert cpu_split([0]) is None  # nothing to split
    assert cpu_split([3, 1]) == CpuSplit(server=(1,), clients=(3,))
    assert cpu_split(range(8)) == CpuSplit(server=tuple(range(7)), clients=(7,))
    assert cpu_split(range(16)) == CpuSplit(server=tuple(range(14)), clients=(14, 15))
    assert cpu_split([0, 1]).words() == "Triton on CPU 0, the load clients on CPU 1"
    assert cpu_split(range(4)).words() == "Triton on CPUs 0, 1, 2, the load clients on CPU 3"


def test_a_pinned_server_and_its_backend_stubs_run_on_its_cpus_and_the_load_clients_on_theirs(tmp_path):
    import os
    import threading

    import psutil

    from pipelines.triton_local import TritonServer

    mine = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpu = mine[0], mine[-1]  # one CPU for both where there is only one: still pinned
    (tmp_path / "repo" / "identity" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "identity" / "1" / "model.py").write_text(IDENTITY_PY)
    (tmp_path / "repo" / "identity" / "config.pbtxt").write_text(IDENTITY_CONFIG.format(name="identity", max_batch=8))
    server = TritonServer(tmp_path / "repo", tmp_path / "work", cpus=(server_cpu,))
    server.start()
    try:
        load = urllib.request.Request(f"http://{server.url}/v2/repository/models/identity/load", data=b"{}",
                                      method="POST")
        with urllib.request.urlopen(load, timeout=60) as resp:
            assert resp.status == 200
        stubs = psutil.Process(server.proc.pid).children(recursive=True)
        assert stubs, "the Python backend runs its model in a stub process the server starts"
        for proc in [psutil.Process(server.proc.pid), *stubs]:
            assert proc.cpu_affinity() == [server_cpu], proc.cmdline()
            for thread in proc.threads():
                assert os.sched_getaffinity(thread.id) == {server_cpu}, (proc.cmdline(), thread.id)

        settings = Settings(concurrencies=(2,), batch_sizes=(1,), window_s=0.3, stability_pct=1e9,
                            warmup_requests=2, client_cpus=(client_cpu,))
        target = prepare(server.url, "identity", server_pid=server.proc.pid, settings=settings)
        seen: dict[int, set[int]] = {}
        measuring = threading.Thread(target=measure_point, args=(target, 2, 1, settings))
        measuring.start()
        while measuring.is_alive():
            for t in threading.enumerate():
                if t.name.startswith("hil-client-") and t.native_id is not None:
                    try:
                        seen[t.native_id] = os.sched_getaffinity(t.native_id)
                    except OSError:
                        pass  # the thread ended meanwhile
            measuring.join(0.1)
        assert len(seen) == 2 and all(cpus == {client_cpu} for cpus in seen.values()), seen
        assert os.sched_getaffinity(0) == set(mine)  # the measuring thread itself is left as it was
    finally:
        server.stop()
