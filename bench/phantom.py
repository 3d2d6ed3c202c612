"""Seconds to draw one phantom tile (synth.draw_phantom_tile), best of N, on this machine's CPU.

The tests never time anything; this is where the phantom's speed (target: under 0.3 s per
1024x1024 tile on one core) is measured. Figures go in bench/RESULTS.md.

    python bench/phantom.py [--size 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

from cytosynth.synth import draw_phantom_tile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times = []
    for index in range(args.repeats):
        started = time.perf_counter()
        draw_phantom_tile(index, args.size)
        times.append(time.perf_counter() - started)
    print(f"phantom {args.size}x{args.size}: best {min(times):.3f} s, mean {sum(times) / len(times):.3f} s "
          f"over {args.repeats} tiles")


if __name__ == "__main__":
    main()
