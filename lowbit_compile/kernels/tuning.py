"""Tile-config tuning for our Triton kernels, cached on disk so a second compile does not retune.

A kernel family hands `pick` a key (what the best config depends on: GPU, Triton version, kernel
source, shapes, dtypes, M bucket), its candidate configs and a function that builds a runnable
launch for a config. Each candidate is timed by CUDA-graph replay (`measure`: the median of
`REPLAYS` replays of a graph of launches, `FINAL_REP_MS` of replay in all) and the fastest is stored
in `$LOWBIT_CACHE_DIR/tuning.json` (default `~/.cache/lowbit_compile`). With
`LOWBIT_TUNING_SCREEN_MS=T`, every candidate is first timed over T ms and only the `FINALISTS`
fastest are timed again at full length. `LOWBIT_AUTOTUNE=0` skips tuning and takes each family's
default config. Time spent and cache hits are counted in `torch._dynamo.utils.counters["lowbit"]`
(`tuning_seconds_x1000`, `tuning_runs`, `tuning_cache_hits`; building the candidates' launches,
which compiles them, `tuning_build_seconds_x1000` (`bucket_plan` builds before `pick` starts its
clock); their first calls and their timing, `tuning_first_call_seconds_x1000`,
`tuning_timing_seconds_x1000`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_CACHE_FILE = "tuning.json"


def tuning_enabled() -> bool:
    """Tune only on a real GPU, and unless the user turned it off."""
    if os.environ.get("LOWBIT_AUTOTUNE", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.is_available()


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE_DIR") or Path.home() / ".cache" / "lowbit_compile")


@functools.cache
def source_digest(path: str) -> str:
    """A short digest of a kernel file: a changed kernel never reuses an old tuning result."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _store(path: Path, key: str, value: Any) -> None:
    """Merge one entry into the cache file (re-read first: other processes may have added entries)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _load(path)
        entries[key] = value
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(entries, indent=1, sort_keys=True))
        temporary.replace(path)
    except OSError as error:  # a read-only home must not break compiling
        log.warning("could not write the tuning cache %s: %s", path, error)


_memory: dict[str, Any] = {}

# Timing. Each candidate's launch is captured in a CUDA graph of as many launches as last about
# rep / REPLAYS ms, replayed REPLAYS times; the median per launch is its time. `rep` is FINAL_REP_MS,
# or the screen's window where screening is on (a short timing of every candidate first, then the
# FINALISTS fastest again at full length). TIMER "triton" times with Triton's `do_bench_cudagraph`
# instead (as up to the eleventh session: ten replays of a graph of `rep` ms each, and a capture of
# thousands of launches per candidate for a microsecond kernel: ~0.3 s a candidate, tuning was ~2/3
# of a w4a16 compile, RESULTS.md). LOWBIT_TUNING_TIMER overrides TIMER. Screening is off: with this
# timer a 4 ms screen saved ~1 s of a 4-layer Llama's tuning (RESULTS.md, eleventh session).
SCREEN_REP_MS = 0.0
FINAL_REP_MS = 20.0
FINALISTS = 3
REPLAYS = 5
TIMER = "replay"
# Candidates compiled at once before timing (their first launch); LOWBIT_TUNING_THREADS overrides.
THREADS = 8


def _timer() -> str:
    timer = os.environ.get("LOWBIT_TUNING_TIMER", TIMER)
    if timer not in ("replay", "triton"):
        raise ValueError(f"LOWBIT_TUNING_TIMER must be 'replay' or 'triton', got {timer!r}")
    return timer


def _screen_rep_ms() -> float:
    text = os.environ.get("LOWBIT_TUNING_SCREEN_MS")
    if text is None:
        return SCREEN_REP_MS
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"LOWBIT_TUNING_SCREEN_MS must be a number of milliseconds (0: off), got {text!r}") from None


def measure(launch: Callable[[], None], rep: float = FINAL_REP_MS) -> float:
    """Milliseconds per call of `launch`, by CUDA-graph replay: kernel time without the Python and
    launch overhead (which would hide the differences between configs, and which a served model
    run under CUDA graphs does not pay). Eager timing where a graph cannot be captured. The first
    call (it compiles the config) and the timing are counted apart (`tuning_first_call_seconds_x1000`,
    `tuning_timing_seconds_x1000`)."""
    from torch._dynamo.utils import counters
    from triton.testing import do_bench, do_bench_cudagraph

    start = time.perf_counter()
    launch()
    torch.cuda.synchronize()
    timed = time.perf_counter()
    counters["lowbit"]["tuning_first_call_seconds_x1000"] += int((timed - start) * 1000)
    try:
        if _timer() == "triton":
            return do_bench_cudagraph(launch, rep=rep, return_mode="median")
        return _replay_ms(launch, rep)
    except RuntimeError as error:  # e.g. called while another stream is capturing
        log.debug("CUDA-graph timing failed (%s); timing eagerly", error)
        return do_bench(launch, warmup=5, rep=rep, return_mode="median")
    finally:
        counters["lowbit"]["tuning_timing_seconds_x1000"] += int((time.perf_counter() - timed) * 1000)


def _graph_of(launch: Callable[[], None], count: int) -> Any:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(count):
            launch()
    return graph


def _replay_ms(launch: Callable[[], None], rep: float) -> float:
    """Median ms per launch over REPLAYS replays of a CUDA graph of launches lasting ~rep / REPLAYS ms
    (its length from one replay of a graph of 5). Captured on a side stream, as graphs must be."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        probe = _graph_of(launch, 5)
        start.record()
        probe.replay()
        end.record()
        end.synchronize()
        estimate = max(start.elapsed_time(end) / 5, 1e-4)
        count = max(1, min(10_000, int(rep / REPLAYS / estimate)))
        graph = _graph_of(launch, count)
        samples = []
        for _ in range(REPLAYS):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / count)
    torch.cuda.current_stream().wait_stream(stream)
    samples.sort()
    return samples[len(samples) // 2]


def _threads() -> int:
    text = os.environ.get("LOWBIT_TUNING_THREADS")
    if text is None:
        return THREADS
    try:
        threads = int(text)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"LOWBIT_TUNING_THREADS must be a whole number >= 1, got {text!r}")
    return threads


def _prepare(
    key: str, indexed: Sequence[tuple[Any, Any]], make_launch: Callable[[Any], Callable[[], None]]
) -> dict[Any, Callable[[], None]]:
    """`make_launch` of each candidate (index -> launch; it compiles the config), the first alone
    (one-time set-up: the family's weight copies, Triton's driver) and the rest up to `_threads()`
    at once on the caller's CUDA device: Triton's compiler spends most of a compile in C++ passes and
    ptxas without the GIL, so compiles overlap (Inductor precompiles its choices in threads too).
    A candidate that fails (e.g. out of shared memory) is logged and left out."""
    from torch._dynamo.utils import counters

    device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def build(candidate: Any) -> Callable[[], None]:
        if device is None:
            return make_launch(candidate)
        with torch.cuda.device(device):
            return make_launch(candidate)

    started = time.perf_counter()
    launches: dict[Any, Callable[[], None]] = {}

    def keep(index: Any, candidate: Any, result: Callable[[], Callable[[], None]]) -> None:
        try:
            launches[index] = result()
        except Exception as error:  # noqa: BLE001 - a config the compiler rejects
            log.debug("config %s failed for %s: %s", candidate, key, error)

    if not indexed:
        return launches
    first, rest = indexed[0], indexed[1:]
    keep(first[0], first[1], lambda: build(first[1]))
    threads = min(_threads(), len(rest))
    if threads <= 1:
        for index, candidate in rest:
            keep(index, candidate, lambda candidate=candidate: build(candidate))
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="lowbit-tuning") as pool:
            futures = [(index, candidate, pool.submit(build, candidate)) for index, candidate in rest]
            for index, candidate, future in futures:
                keep(index, candidate, future.result)  # (in order: a failure is logged, the rest kept)
    counters["lowbit"]["tuning_build_seconds_x1000"] += int((time.perf_counter() - started) * 1000)
    return launches


def _time_each(
    key: str, indexed: Sequence[tuple[int, Any]], launches: dict[int, Callable[[], None]], rep: float
) -> list[tuple[float, int, Any]]:
    """(ms, index, candidate) for each candidate that compiled and runs (ties go to the earlier)."""
    timings = []
    for index, candidate in indexed:
        if index not in launches:
            continue
        try:
            timings.append((measure(launches[index], rep), index, candidate))
        except Exception as error:  # noqa: BLE001 - a config that fails at run time
            log.debug("config %s failed for %s: %s", candidate, key, error)
    return timings


def _known(key: str, decode: Callable[[Any], Any]) -> Any:
    """The config tuned for `key` in this process or in the disk cache, else None."""
    from torch._dynamo.utils import counters

    if key in _memory:
        return _memory[key]
    stored = _load(cache_dir() / _CACHE_FILE).get(key)
    if stored is None:
        return None
    counters["lowbit"]["tuning_cache_hits"] += 1
    _memory[key] = decode(stored)
    return _memory[key]


def pick(
    key: str,
    candidates: Sequence[Any],
    make_launch: Callable[[Any], Callable[[], None]],
    encode: Callable[[Any], Any],
    decode: Callable[[Any], Any],
    prepared: dict[int, Callable[[], None]] | None = None,
) -> Any:
    """The fastest of `candidates` for `key`, from memory, the disk cache, or by measuring them.
    `prepared`: the candidates' launches by index, built already (`bucket_plan` builds those of
    all its buckets at once); a missing index is a candidate that failed to build."""
    from torch._dynamo.utils import counters

    known = _known(key, decode)
    if known is not None:
        return known
    path = cache_dir() / _CACHE_FILE
    start = time.perf_counter()
    screen = _screen_rep_ms()
    indexed = list(enumerate(candidates))
    launches = prepared if prepared is not None else _prepare(key, indexed, make_launch)
    if screen > 0 and len(indexed) > FINALISTS:
        ranked = [(index, candidate) for _, index, candidate in sorted(_time_each(key, indexed, launches, screen))]
        timings = []
        for first in range(0, len(ranked), FINALISTS):  # the next three where all three fail at full length
            timings = _time_each(key, ranked[first : first + FINALISTS], launches, FINAL_REP_MS)
            if timings:
                break
    else:
        timings = _time_each(key, indexed, launches, FINAL_REP_MS)
    if not timings:
        raise RuntimeError(f"no candidate config ran for {key}")
    best_ms, _, best = min(timings)
    elapsed = time.perf_counter() - start
    counters["lowbit"]["tuning_runs"] += 1
    counters["lowbit"]["tuning_seconds_x1000"] += int(elapsed * 1000)
    log.info("tuned %s: %s (%.1f us) from %d configs in %.1f s", key, best, best_ms * 1e3, len(candidates), elapsed)
    _store(path, key, encode(best))
    _memory[key] = best
    return best


def bucket_plan(
    family: str,
    source: str,
    shape_key: str,
    out_dtype: torch.dtype,
    has_bias: bool,
    device: torch.device,
    tune: bool,
    candidates: Callable[[int], Sequence[Any]],
    make_launch: Callable[[int, Any], Callable[[], None]],
    default: Callable[[int], Any],
    config_type: Any,
    tunes_bucket: Callable[[int | None], bool] = lambda last: True,
    buckets: Sequence[tuple[int, int | None, int]] | None = None,
) -> tuple[int, ...]:
    """A kernel family's plan: one config per M bucket (`buckets`, by default `common.M_BUCKETS`),
    flattened into the op's `int[]` argument. With `tune`, each bucket that `tunes_bucket(last row)`
    accepts is tuned (`pick`, keyed by family, GPU, Triton, the kernel's `source` file, `shape_key`,
    dtype, bias and bucket);
    the others take `default(bucket_m)`. `make_launch(bucket_m, config)` builds a timed launch;
    `config_type` has `as_tuple` / `from_tuple`."""
    import triton

    from lowbit_compile.kernels import common

    def key(bucket_m: int) -> str:
        return "|".join(
            (
                family,
                torch.cuda.get_device_name(device),
                triton.__version__,
                source_digest(source),
                shape_key,
                str(out_dtype),
                f"bias{int(has_bias)}",
                f"m{bucket_m}",
            )
        )

    m_buckets = common.M_BUCKETS if buckets is None else tuple(buckets)
    tuned = [bucket_m for _, last, bucket_m in m_buckets if tune and tunes_bucket(last)]
    # The candidates of every bucket still to tune are built (compiled) together: more compiles
    # in flight than one bucket has
    pending = {m: list(candidates(m)) for m in tuned if _known(key(m), config_type.from_tuple) is None}
    built = _prepare(
        family,
        [((m, index), (m, config)) for m, configs in pending.items() for index, config in enumerate(configs)],
        lambda bucket_and_config: make_launch(*bucket_and_config),
    )
    plan = []
    for first, last, bucket_m in m_buckets:
        if bucket_m in tuned:  # known by now, or pending with its launches built
            config = pick(
                key(bucket_m),
                pending.get(bucket_m, []),
                lambda config, m=bucket_m: make_launch(m, config),
                encode=config_type.as_tuple,
                decode=config_type.from_tuple,
                prepared={i: launch for (m, i), launch in built.items() if m == bucket_m},
            )
        else:
            config = default(bucket_m)
        plan.append((first, last, config.as_tuple()))
    return tuple(common.flatten_plan(plan))
