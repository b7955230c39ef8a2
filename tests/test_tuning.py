"""`kernels.tuning.pick` without a GPU: `measure` replaced by a table of timings per (candidate,
window). Checks the screen-then-confirm order, what is stored, and the failure paths."""

from __future__ import annotations

import json

import pytest
from torch._dynamo.utils import counters

from lowbit_compile.kernels import tuning


@pytest.fixture
def timed(monkeypatch, tmp_path):
    """Candidates are names; `times[name]` is (screen ms, full ms); records each (name, rep).
    Screening on (4 ms windows) unless a test says otherwise."""
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LOWBIT_TUNING_SCREEN_MS", "4")
    monkeypatch.setattr(tuning, "_memory", {})
    calls: list[tuple[str, float]] = []
    times: dict[str, tuple[float, float]] = {}

    def make_launch(name):
        if name not in times:
            raise RuntimeError(f"{name}: out of shared memory")
        return name

    def measure(launch, rep=tuning.FINAL_REP_MS):
        calls.append((launch, rep))
        screen, full = times[launch]
        return full if rep == tuning.FINAL_REP_MS else screen

    monkeypatch.setattr(tuning, "measure", measure)
    counters.clear()
    return times, calls, make_launch, tmp_path


def _pick(key, candidates, make_launch):
    return tuning.pick(key, candidates, make_launch, encode=lambda c: c, decode=lambda c: c)


def test_every_candidate_is_screened_and_the_fastest_three_are_timed_again(timed) -> None:
    times, calls, make_launch, path = timed
    # the screen ranks e, c, a, b, d; at full length a is the fastest of those three
    times.update(a=(3.0, 1.0), b=(4.0, 0.5), c=(2.0, 3.0), d=(9.0, 0.1), e=(1.0, 2.0))
    assert _pick("k", list("abcde"), make_launch) == "a"
    assert calls == [(n, 4.0) for n in "abcde"] + [(n, tuning.FINAL_REP_MS) for n in "eca"]
    assert json.loads((path / "tuning.json").read_text()) == {"k": "a"}
    assert counters["lowbit"]["tuning_runs"] == 1


def test_few_candidates_and_a_zero_screen_time_everything_at_full_length(timed, monkeypatch) -> None:
    """Also the default (no screening until measured on a GPU)."""
    times, calls, make_launch, _ = timed
    times.update(a=(1.0, 2.0), b=(2.0, 1.0), c=(3.0, 3.0), d=(4.0, 0.5))
    assert _pick("three", list("abc"), make_launch) == "b"
    assert calls == [(n, tuning.FINAL_REP_MS) for n in "abc"]
    calls.clear()
    for screen in ("0", None):
        calls.clear()
        if screen is None:
            monkeypatch.delenv("LOWBIT_TUNING_SCREEN_MS")
        else:
            monkeypatch.setenv("LOWBIT_TUNING_SCREEN_MS", screen)
        assert _pick(f"four{screen}", list("abcd"), make_launch) == "d"
        assert calls == [(n, tuning.FINAL_REP_MS) for n in "abcd"]


def test_failing_candidates_are_skipped_ties_go_to_the_first_and_results_are_cached(timed) -> None:
    times, calls, make_launch, _ = timed
    times.update(a=(1.0, 1.0), c=(1.0, 1.0), d=(5.0, 5.0), e=(6.0, 6.0))
    assert _pick("k", list("abcde"), make_launch) == "a"  # b fails to build; a and c tie
    calls.clear()
    assert _pick("k", list("abcde"), make_launch) == "a" and calls == []  # memory
    tuning._memory.clear()
    assert _pick("k", list("abcde"), make_launch) == "a" and calls == []  # disk
    assert counters["lowbit"]["tuning_cache_hits"] == 1
    with pytest.raises(RuntimeError, match="no candidate config ran for none"):
        _pick("none", ["x", "y"], make_launch)


def test_the_next_three_are_timed_when_every_finalist_fails_and_a_bad_setting_is_named(timed, monkeypatch) -> None:
    times, calls, make_launch, _ = timed
    times.update(a=(1.0, None), b=(2.0, None), c=(3.0, None), d=(4.0, 0.5))

    def measure(launch, rep=tuning.FINAL_REP_MS):
        calls.append((launch, rep))
        screen, full = times[launch]
        if rep == tuning.FINAL_REP_MS and full is None:
            raise RuntimeError("an illegal memory access at full length")
        return full if rep == tuning.FINAL_REP_MS else screen

    monkeypatch.setattr(tuning, "measure", measure)
    assert _pick("k", list("abcd"), make_launch) == "d"  # a, b, c fail at full length
    assert [c for c in calls if c[1] == tuning.FINAL_REP_MS] == [(n, tuning.FINAL_REP_MS) for n in "abcd"]
    monkeypatch.setenv("LOWBIT_TUNING_SCREEN_MS", "fast")
    with pytest.raises(ValueError, match="LOWBIT_TUNING_SCREEN_MS must be a number of milliseconds"):
        _pick("k2", list("abcd"), make_launch)


def test_timer_choice(monkeypatch) -> None:
    monkeypatch.delenv("LOWBIT_TUNING_TIMER", raising=False)
    assert tuning._timer() == tuning.TIMER == "replay"
    monkeypatch.setenv("LOWBIT_TUNING_TIMER", "triton")
    assert tuning._timer() == "triton"
    monkeypatch.setenv("LOWBIT_TUNING_TIMER", "fast")
    with pytest.raises(ValueError, match="LOWBIT_TUNING_TIMER must be 'replay' or 'triton'"):
        tuning._timer()


def test_candidates_are_built_once_the_first_alone_then_in_threads(timed, monkeypatch) -> None:
    import threading

    times, _, _, _ = timed
    times.update(a=(1.0, 4.0), b=(1.0, 1.0), c=(1.0, 0.5), d=(1.0, 3.0), e=(1.0, 5.0), f=(1.0, 6.0))
    built: list[tuple[str, str]] = []
    first_done = threading.Event()

    def make_launch(name):
        if name != "a":
            assert first_done.wait(5), "a candidate was built before the first one finished"
        built.append((name, threading.current_thread().name))
        if name == "a":
            first_done.set()
        if name == "c":
            raise RuntimeError("out of shared memory")
        return name

    monkeypatch.setenv("LOWBIT_TUNING_SCREEN_MS", "0")
    monkeypatch.setenv("LOWBIT_TUNING_THREADS", "4")
    assert _pick("threads", list("abcdef"), make_launch) == "b"  # c would be fastest but fails to build
    assert sorted(name for name, _ in built) == list("abcdef")
    assert built[0] == ("a", threading.current_thread().name)
    assert all(thread.startswith("lowbit-tuning") for _, thread in built[1:])


def test_one_thread_builds_in_order_on_the_caller(timed, monkeypatch) -> None:
    import threading

    times, _, _, _ = timed
    times.update(a=(1.0, 2.0), b=(1.0, 1.0), c=(1.0, 3.0))
    built = []

    def make_launch(name):
        built.append((name, threading.current_thread().name))
        return name

    monkeypatch.setenv("LOWBIT_TUNING_THREADS", "1")
    assert _pick("one", list("abc"), make_launch) == "b"
    assert built == [(name, threading.current_thread().name) for name in "abc"]
    for text in ("0", "many"):
        monkeypatch.setenv("LOWBIT_TUNING_THREADS", text)
        with pytest.raises(ValueError, match="LOWBIT_TUNING_THREADS must be a whole number >= 1"):
            tuning._threads()


def test_bucket_plan_builds_every_pending_bucket_at_once(timed, monkeypatch) -> None:
    """One build of all the buckets' candidates (the first alone, the rest in threads), then each
    bucket timed and picked; a bucket already in the disk cache builds nothing."""
    import threading
    from dataclasses import dataclass

    import torch

    from lowbit_compile.kernels import common

    @dataclass(frozen=True)
    class Config:
        value: int

        def as_tuple(self):
            return (self.value,)

        @classmethod
        def from_tuple(cls, values):
            return cls(values[0])

    _, _, _, path = timed
    monkeypatch.setenv("LOWBIT_TUNING_SCREEN_MS", "0")
    monkeypatch.setenv("LOWBIT_TUNING_THREADS", "3")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake GPU")
    monkeypatch.setattr(tuning, "measure", lambda launch, rep=tuning.FINAL_REP_MS: launch())  # the launch: its ms
    built: list[tuple[int, int, str]] = []

    def make_launch(m, config):
        built.append((m, config.value, threading.current_thread().name))
        if config.value % 10 == 3:
            raise RuntimeError("out of shared memory")
        return lambda: float(abs(config.value % 10 - 2))  # x2 is the fastest

    def plan():
        return tuning.bucket_plan(
            "fake", __file__, "n8k8", torch.float16, False, torch.device("cpu"), True,
            lambda m: [Config(m * 10 + i) for i in (1, 2, 3)], make_launch, lambda m: Config(0), Config,
        )  # fmt: skip

    flat = plan()
    buckets = [bucket_m for _, _, bucket_m in common.M_BUCKETS]
    assert flat == tuple(common.flatten_plan([(f, l, (m * 10 + 2,)) for f, l, m in common.M_BUCKETS]))
    assert sorted((m, v) for m, v, _ in built) == sorted((m, m * 10 + i) for m in buckets for i in (1, 2, 3))
    assert built[0][2] == threading.current_thread().name  # the first alone, on the caller
    assert all(name.startswith("lowbit-tuning") for _, _, name in built[1:])
    assert counters["lowbit"]["tuning_runs"] == len(buckets)
    built.clear()
    monkeypatch.setattr(tuning, "_memory", {})  # a new process: the disk cache serves every bucket
    assert plan() == flat and built == []


def test_builders_called_from_threads_build_once_per_argument() -> None:
    import threading
    import time

    from lowbit_compile.kernels import common

    calls = []

    @common.once_per_key
    def operands(m):
        calls.append(m)
        time.sleep(0.02)  # long enough for the other threads to arrive while it builds
        return [m]

    results = []
    threads = [threading.Thread(target=lambda m=m: results.append(operands(m))) for m in (1, 1, 1, 16, 16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(calls) == [1, 16]
    assert sum(r is operands(1) for r in results) == 3 and sum(r is operands(16) for r in results) == 2
