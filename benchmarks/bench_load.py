"""A bounded local load test of the app's ``/detect`` endpoint: N calls from C concurrent clients, none lost,
while long protections run.

Starts the app (``steerguard app``: demo DiT, demo EPS detector, CPU) on a free port of 127.0.0.1 in a
subprocess, waits until it answers, submits ``--protections`` long ``/protect`` jobs (PhotoGuard,
``--protect-steps`` PGD steps on the 128 px example; they queue in the app's slow lane), then C threads, each
with its own ``gradio_client.Client``, share ``--calls`` ``/detect`` calls on the example images of
``apps/examples/`` (one image per call). Every answer must be JSON with ``score``, ``threshold`` and ``verdict``
for the file sent, and the same score as that file's first answer (the EPS noise is seeded, so a mixed-up
answer would show). Prints latency percentiles (per call, client side; p95 is the figure the app is held to),
throughput, whether the protections were still running when the last ``/detect`` answered (then they are
cancelled) and the machine; exit code 1 if any call was lost.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_load [--calls 200 --clients 8 --protections 2]
        [--url http://127.0.0.1:7860/]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from benchmarks.common import cpu_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "apps" / "examples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(port: int, log: Path, extra: list[str] = ()) -> subprocess.Popen:
    """``steerguard app`` on 127.0.0.1:``port`` (CPU, one torch thread, ``extra`` arguments), output to ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "apps.cli", "app", "--port", str(port), "--device", "cpu", *extra]
    with open(log, "wb") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_until_up(url: str, process: subprocess.Popen | None = None, timeout: float = 180.0) -> float:
    """Seconds until ``url`` answers HTTP 200; raises if the server exits or ``timeout`` passes."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the app exited with code {process.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return time.perf_counter() - started
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def check_answer(answer, name: str) -> dict:
    """The entry of a valid ``/detect`` answer for the one file ``name``, with the answer's ``score_dtype``; raises
    ``ValueError`` otherwise."""
    verdicts = answer[0] if isinstance(answer, tuple | list) else answer
    json.dumps(verdicts)  # must be plain JSON
    (entry,) = verdicts["images"]
    if entry["file"] != name:
        raise ValueError(f"answer for {entry['file']!r}, sent {name!r}")
    if not isinstance(entry["score"], float) or not isinstance(entry["threshold"], float):
        raise ValueError(f"score and threshold must be numbers: {entry}")
    if entry["verdict"] not in ("clean", "adversarial"):
        raise ValueError(f"bad verdict {entry['verdict']!r}")
    return {**entry, "score_dtype": verdicts.get("score_dtype")}


def run_load(url: str, calls: int = 200, clients: int = 8, files: list[Path] | None = None) -> dict:
    """``calls`` ``/detect`` calls from ``clients`` threads, each with its own client; the figures as a dict.

    ``lost`` counts the calls without a right answer: raised, malformed, or another score than the file's first
    answer (``errors`` holds the first 20 messages).
    """
    from gradio_client import Client, handle_file

    from apps.tabs.common import EXAMPLE_FILES

    files = files or [EXAMPLES / name for name in EXAMPLE_FILES]  # the app's examples, all >= 32 px
    jobs = list(range(calls))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    scores: dict[str, float] = {}
    dtypes: set[str] = set()

    def worker() -> None:
        try:
            client = Client(url, verbose=False)
        except Exception as error:  # a client that cannot connect loses its share: counted below
            with lock:
                errors.append(f"client: {type(error).__name__}: {error}")
            return
        while True:
            with lock:
                if not jobs:
                    return
                i = jobs.pop()
            path = files[i % len(files)]
            t0 = time.perf_counter()
            try:
                answer = client.predict([handle_file(str(path))], api_name="/detect")
                entry = check_answer(answer, path.stem)
                score = entry["score"]
            except Exception as error:
                with lock:
                    errors.append(f"call {i}: {type(error).__name__}: {error}")
                continue
            elapsed = time.perf_counter() - t0
            with lock:
                dtypes.add(str(entry.get("score_dtype")))
                first = scores.setdefault(path.stem, score)
                if abs(first - score) > 1e-6 * max(1.0, abs(first)):
                    errors.append(f"call {i}: score {score} for {path.stem}, first answer {first}")
                else:
                    latencies.append(elapsed)

    threads = [threading.Thread(target=worker, name=f"client-{k}") for k in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    answered = len(latencies)
    result = {
        "calls": calls,
        "clients": clients,
        "answered": answered,
        "lost": calls - answered,
        "errors": errors[:20],
        "wall_s": wall,
        "throughput_per_s": answered / wall if wall else 0.0,
        "score_dtypes": sorted(dtypes),
    }
    if latencies:
        result.update({f"p{q}_s": percentile(latencies, q) for q in (50, 90, 95, 99)})
        result["max_s"] = max(latencies)
        result["mean_s"] = sum(latencies) / answered
    return result


def start_protections(url: str, count: int, steps: int) -> list:
    """``count`` long ``/protect`` jobs (PhotoGuard, ``steps`` PGD steps, the 128 px example, no preview), submitted
    from one client; returns the gradio_client jobs."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    image = handle_file(str(EXAMPLES / "checker-128.png"))
    return [client.submit([image], "photoguard", 8, steps, k, False, api_name="/protect") for k in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--protections", type=int, default=2, help="long /protect jobs running during the load")
    parser.add_argument("--protect-steps", type=int, default=500, help="PGD steps of each of those jobs")
    parser.add_argument("--url", default=None, help="load an app already running here instead of starting one")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument(
        "--detect-dtype", default="auto", help="the started app's --detect-dtype (auto, float32, bfloat16, float16)"
    )
    args = parser.parse_args(argv)
    if args.calls < 1 or args.clients < 1 or args.protections < 0 or not 1 <= args.protect_steps <= 500:
        parser.error("--calls and --clients must be positive, --protections >= 0, 1 <= --protect-steps <= 500")

    process = None
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"steerguard-bench-load-{os.getpid()}.log"
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        options = ["--max-seconds", "3600", "--time-limit", "3600", "--detect-dtype", args.detect_dtype]
        process = start_app(port, log, options)
    protections = []
    try:
        startup = wait_until_up(url, process)
        protections = start_protections(url, args.protections, args.protect_steps)
        time.sleep(5.0 if protections else 0.0)  # the first protection is running before the load starts
        load_before = os.getloadavg()[0]
        result = run_load(url, args.calls, args.clients)
        states = [job.status().code.name for job in protections]
        result["protections"] = {"count": len(protections), "steps": args.protect_steps, "states_at_end": states}
    finally:
        for job in protections:
            job.cancel()
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    import gradio

    result.update(
        {
            "startup_s": startup,
            "machine": f"{cpu_model()}, {os.cpu_count()} CPU(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
            "load_average_1min": [load_before, os.getloadavg()[0]],  # before and after: other work on the machine
            "software": f"Python {platform.python_version()}, gradio {gradio.__version__}",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
    )
    print(f"/detect load test, {result['date']}: {result['machine']}; {result['software']}")
    print(
        f"app answered after {startup:.1f} s; {args.calls} calls from {args.clients} concurrent clients "
        f"(1-min load average {load_before:.2f} before, {result['load_average_1min'][1]:.2f} after)"
    )
    if protections:
        print(
            f"{len(protections)} /protect jobs of {args.protect_steps} PGD steps submitted before the load; "
            f"their states when the last /detect answered: {', '.join(result['protections']['states_at_end'])}"
        )
    print(f"answered {result['answered']}/{args.calls}, lost {result['lost']}; score model in {result['score_dtypes']}")
    if result["answered"]:
        print(
            "latency p50 {p50_s:.3f} s, p90 {p90_s:.3f} s, p95 {p95_s:.3f} s, p99 {p99_s:.3f} s, max {max_s:.3f} s; "
            "throughput {throughput_per_s:.2f} calls/s over {wall_s:.1f} s".format(**result)
        )
    for error in result["errors"]:
        print("error:", error)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if process is not None and result["lost"]:
        print(f"server log: {log}")
    return 1 if result["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
