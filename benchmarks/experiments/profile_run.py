"""cProfile a benchmark script, printing the profile also when the run is cut off (SIGTERM from
`timeout`): `python benchmarks/experiments/profile_run.py OUT_PREFIX SCRIPT [ARGS...]` writes
OUT_PREFIX.cum.txt and OUT_PREFIX.tot.txt (top functions by cumulative and by own time)."""

from __future__ import annotations

import cProfile
import os
import pstats
import runpy
import signal
import sys


def main() -> None:
    prefix, script, *args = sys.argv[1:]
    profile = cProfile.Profile()

    def dump(*_: object) -> None:
        profile.disable()
        for key, name in (("cumulative", "cum"), ("tottime", "tot")):
            with open(f"{prefix}.{name}.txt", "w") as f:
                pstats.Stats(profile, stream=f).sort_stats(key).print_stats(80)
        print(f"profile written to {prefix}.cum.txt / .tot.txt", flush=True)

    def stop(*_: object) -> None:
        dump()
        os._exit(124)

    signal.signal(signal.SIGTERM, stop)
    sys.argv = [script, *args]
    profile.enable()
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        dump()


if __name__ == "__main__":
    main()
