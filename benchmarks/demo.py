"""Start-up time of ``guidekit demo`` and the wall time of a three-method comparison through its page's API.

    python benchmarks/demo.py                  # the embedded default model on this machine's CPU
    python benchmarks/demo.py --threads 1      # torch's intra-op threads, in the server and the baseline

The server is the README's main command, ``guidekit demo``, started as a fresh process with ``HF_HUB_OFFLINE=1``;
start-up is the time until ``/`` answers 200 and until the API's config answers. Then a ``gradio_client`` sends the
issue's comparison, CFG(3), APG(3, eta=0) and PCG(gamma=5) at 20 steps with 4 images per method, once cold and
``--rounds`` times warm. The baseline, interleaved with the warm requests, is the same ``Comparer.compare`` in this
process, without server, queue, page or HTTP: the ratio of medians (request / in-process) is what the page costs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request

import torch
from _common import interleaved, machine, median

METHODS = ["cfg(scale=3)", "apg(scale=3, eta=0)", "pcg(gamma=5)", ""]
SETTINGS = {"model": "default", "scheduler": "pipeline's own", "class_label": 3, "prompt": "", "negative_prompt": "",
            "seed": 0, "steps": 20, "num_images": 4}


def _wait_for(url: str, deadline: float) -> float:
    """Seconds until ``url`` answers 200 (polling every 50 ms), or an error after ``deadline`` seconds."""
    start = time.perf_counter()
    while time.perf_counter() - start < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {deadline} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=7870)
    parser.add_argument("--rounds", type=int, default=5, help="warm requests (and in-process baselines)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    url = f"http://127.0.0.1:{args.port}/"
    server = subprocess.Popen([sys.executable, "-m", "guidekit", "demo", "--port", str(args.port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        page = _wait_for(url, 120)
        config = _wait_for(url + "config", 120) + page
        from gradio_client import Client

        from guidekit.app.compare import Comparer

        client = Client(url, verbose=False)

        def request() -> None:
            client.predict(*SETTINGS.values(), *METHODS, api_name="/compare")

        start = time.perf_counter()
        request()
        cold = time.perf_counter() - start
        comparer = Comparer(device="cpu")
        comparer.compare(METHODS, steps=20, num_images=4, class_label=3)  # its warm-up
        times = interleaved({
            "request": request,
            "in_process": lambda: comparer.compare(METHODS, steps=20, num_images=4, class_label=3),
        }, args.rounds, "cpu")
    finally:
        server.terminate()
        server.wait(timeout=30)
    ratio = median(times["request"]) / median(times["in_process"])
    print(f"\nguidekit demo (default model), {args.rounds} warm rounds\n")
    print("| measure | seconds |\n|---|---|")
    print(f"| start-up: page answers 200 | {page:.1f} |")
    print(f"| start-up: API config answers 200 | {config:.1f} |")
    print(f"| first comparison (cold), 3 methods x 4 images, 20 steps | {cold:.2f} |")
    print(f"| comparison through the page's API, median warm | {median(times['request']):.2f} |")
    print(f"| same comparison in process, median | {median(times['in_process']):.2f} |")
    print(f"| ratio request / in-process | {ratio:.2f} |")


if __name__ == "__main__":
    main()
