"""Throughput and size of the binary vs the JSON telemetry codec (README §2.1, §2.2).

Run as a script: ``python tests/bench/bench_codec.py [--k 64] [--features 8]``. Each operation is
timed with ``time.perf_counter`` over several repetitions, each long enough to be measurable;
the table shows the median. Importing this module does nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def _time_per_call(fn: Callable[[], Any], repeats: int, min_time: float) -> float:
    """Median seconds per call over ``repeats`` repetitions of at least ``min_time`` each."""
    number = 1
    while True:  # calibrate
        start = time.perf_counter()
        for _ in range(number):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time / 4:
            break
        number *= 2
    number = max(1, int(number * min_time / max(elapsed, 1e-9)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number)
    return statistics.median(samples)


def _machine() -> str:
    import numpy as np
    import pydantic

    return (
        f"{platform.platform()} | {platform.machine()} {platform.processor() or ''}".rstrip()
        + f" | cpus={os.cpu_count()} | Python {platform.python_version()}"
        + f" | numpy {np.__version__} | pydantic {pydantic.VERSION}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--k", type=int, default=64, help="readings per batch (default 64)")
    parser.add_argument("--features", type=int, default=8, help="features per reading (default 8)")
    parser.add_argument("--frac-bits", type=int, default=10, help="binary fixed point (default 10)")
    parser.add_argument("--repeats", type=int, default=7, help="repetitions, median (default 7)")
    parser.add_argument(
        "--min-time", type=float, default=0.2, help="seconds per repetition (default 0.2)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import numpy as np

    from edge_agent.wire import (
        TelemetryBatch,
        decode_telemetry,
        encode_binary,
        encode_binary_raw,
        encode_json,
        quantise_conf,
        quantise_features,
    )

    k, n_features, frac_bits = args.k, args.features, args.frac_bits
    rng = np.random.default_rng(args.seed)
    # values a device would send: exactly representable in both encodings
    features_q = quantise_features(rng.normal(0.0, 2.0, (k, n_features)), frac_bits)
    conf_q = quantise_conf(rng.uniform(0.3, 1.0, k))
    pred = rng.integers(0, 4, k).astype(np.uint8)
    header = {"seq": 41, "boot": 3, "ts_ms": 1764028800000, "param_version": 7}
    batch = TelemetryBatch.create(
        **header,
        features=np.ldexp(features_q.astype(np.float64), -frac_bits),
        pred=pred,
        conf=conf_q / 256.0,
    )
    frame = encode_binary(batch, frac_bits)
    payload = encode_json(batch)
    if decode_telemetry(frame) != batch or decode_telemetry(payload) != batch:
        print("codec mismatch: binary and JSON do not decode to the same batch", file=sys.stderr)
        return 1

    def encode_raw() -> bytes:
        return encode_binary_raw(features_q, pred, conf_q, **header, frac_bits=frac_bits)

    rows = [
        ("binary", "encode (device, int16)", encode_raw, len(frame)),
        ("binary", "encode (float batch)", lambda: encode_binary(batch, frac_bits), len(frame)),
        ("binary", "decode", lambda: decode_telemetry(frame), len(frame)),
        ("json", "encode", lambda: encode_json(batch), len(payload)),
        ("json", "decode", lambda: decode_telemetry(payload), len(payload)),
    ]
    print(f"machine: {_machine()}")
    print(
        f"batch: k={k} readings x F={n_features} features, frac_bits={frac_bits}; "
        f"median of {args.repeats} repetitions of >= {args.min_time} s"
    )
    print()
    print(
        f"{'codec':<7} {'operation':<24} {'us/batch':>10} {'readings/s':>13} {'bytes/reading':>14}*"
    )
    rate: dict[tuple[str, str], float] = {}
    for codec, op, fn, size in rows:
        t = _time_per_call(fn, args.repeats, args.min_time)
        rate[(codec, op)] = k / t
        print(f"{codec:<7} {op:<24} {t * 1e6:>10.1f} {k / t:>13,.0f} {size / k:>14.2f}")
    print()
    print("* whole payload / k: the binary header's 28 bytes are shared by the k readings")
    print()
    enc = rate[("binary", "encode (float batch)")] / rate[("json", "encode")]
    dec = rate[("binary", "decode")] / rate[("json", "decode")]
    print("ratio binary / JSON:")
    print(f"  encode throughput  {enc:6.1f}x")
    print(f"  decode throughput  {dec:6.1f}x")
    print(
        f"  bytes per reading  {len(frame) / len(payload):6.3f}  ({len(frame)} vs {len(payload)} B)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
