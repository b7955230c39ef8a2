"""Tile-config tuning for our Triton kernels, cached on disk so a second compile does not retune.

A kernel family hands `pick` a key (what the best config depends on: GPU, Triton version, kernel
source, shapes, dtypes, M bucket), its candidate configs and a function that builds a runnable
launch for a config. Each candidate is timed by CUDA-graph replay (`measure`, median over
`FINAL_REP_MS` windows) and the fastest is stored in `$LOWBIT_CACHE_DIR/tuning.json` (default
`~/.cache/lowbit_compile`). With `LOWBIT_TUNING_SCREEN_MS=T` (off by default until measured on a
GPU), every candidate is first timed over T ms windows and only the `FINALISTS` fastest are timed
again at full length. `LOWBIT_AUTOTUNE=0` skips
tuning and takes each family's default config. Time spent and cache hits are counted in
`torch._dynamo.utils.counters["lowbit"]` (`tuning_seconds_x1000`, `tuning_runs`, `tuning_cache_hits`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
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

# Timing windows (ms of replay per sample). A full-length timing of a microsecond kernel captures a
# graph of thousands of launches, a few tenths of a second per candidate; tuning is ~2/3 of a
# w4a16 compile (RESULTS.md, ninth session). Screening (a short window first) is off until an A/B
# on the GPU shows it saves time without worse picks.
SCREEN_REP_MS = 0.0
FINAL_REP_MS = 20.0
FINALISTS = 3


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
    run under CUDA graphs does not pay). Eager timing where a graph cannot be captured."""
    from triton.testing import do_bench, do_bench_cudagraph

    launch()
    torch.cuda.synchronize()
    try:
        return do_bench_cudagraph(launch, rep=rep, return_mode="median")
    except RuntimeError as error:  # e.g. called while another stream is capturing
        log.debug("CUDA-graph timing failed (%s); timing eagerly", error)
        return do_bench(launch, warmup=5, rep=rep, return_mode="median")


def _time_each(
    key: str, indexed: Sequence[tuple[int, Any]], make_launch: Callable[[Any], Callable[[], None]], rep: float
) -> list[tuple[float, int, Any]]:
    """(ms, index, candidate) for each candidate that compiles and runs (ties go to the earlier)."""
    timings = []
    for index, candidate in indexed:
        try:
            launch = make_launch(candidate)
            timings.append((measure(launch, rep), index, candidate))
        except Exception as error:  # noqa: BLE001 - a config the compiler rejects (e.g. out of shared memory)
            log.debug("config %s failed for %s: %s", candidate, key, error)
    return timings


def pick(
    key: str,
    candidates: Sequence[Any],
    make_launch: Callable[[Any], Callable[[], None]],
    encode: Callable[[Any], Any],
    decode: Callable[[Any], Any],
) -> Any:
    """The fastest of `candidates` for `key`, from memory, the disk cache, or by measuring them."""
    from torch._dynamo.utils import counters

    if key in _memory:
        return _memory[key]
    path = cache_dir() / _CACHE_FILE
    stored = _load(path).get(key)
    if stored is not None:
        counters["lowbit"]["tuning_cache_hits"] += 1
        _memory[key] = decode(stored)
        return _memory[key]
    start = time.perf_counter()
    screen = _screen_rep_ms()
    indexed = list(enumerate(candidates))
    if screen > 0 and len(indexed) > FINALISTS:
        ranked = [(index, candidate) for _, index, candidate in sorted(_time_each(key, indexed, make_launch, screen))]
        timings = []
        for first in range(0, len(ranked), FINALISTS):  # the next three where all three fail at full length
            timings = _time_each(key, ranked[first : first + FINALISTS], make_launch, FINAL_REP_MS)
            if timings:
                break
    else:
        timings = _time_each(key, indexed, make_launch, FINAL_REP_MS)
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
) -> tuple[int, ...]:
    """A kernel family's plan: one config per M bucket (`common.M_BUCKETS`), flattened into the op's
    `int[]` argument. With `tune`, each bucket that `tunes_bucket(last row)` accepts is tuned (`pick`,
    keyed by family, GPU, Triton, the kernel's `source` file, `shape_key`, dtype, bias and bucket);
    the others take `default(bucket_m)`. `make_launch(bucket_m, config)` builds a timed launch;
    `config_type` has `as_tuple` / `from_tuple`."""
    import triton

    from lowbit_compile.kernels import common

    buckets = []
    for first, last, bucket_m in common.M_BUCKETS:
        if tune and tunes_bucket(last):
            key = "|".join(
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
            config = pick(
                key,
                candidates(bucket_m),
                lambda config, m=bucket_m: make_launch(m, config),
                encode=config_type.as_tuple,
                decode=config_type.from_tuple,
            )
        else:
            config = default(bucket_m)
        buckets.append((first, last, config.as_tuple()))
    return tuple(common.flatten_plan(buckets))
