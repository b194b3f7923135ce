"""Run a command-line script on N CPU processes as torchrun would, forked from a warm process.

Each of the suite's training runs is a few iterations of a tiny model; launched through
`torch.distributed.run`, each one paid the launcher's and every rank's interpreter start-up
(importing torch, then torch._dynamo, which torch's optimizers import on first use: ~5 s of CPU
a process on the 2-core development machine, against ~0.3 s of training per iteration), so a
4-process layout test spent ~25 s of CPU to train for ~1.5 s. Here the ranks fork from a
multiprocessing forkserver that imported those modules once, get the environment torchrun gives
its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR / MASTER_PORT, ...), and run the script as
`__main__` with its argv: the same script, flags and code path, without the launcher. Launching
itself stays tested through torchrun where that is the point (tests/test_signal_pp2.py, the
torchrun tests of tests/test_parallel_inference.py, tests/test_server_parallel.py and
tests/test_tuning.py).
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import wait

from tests.distributed import context, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rank(script: str, argv: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    os.environ.clear()  # the environment the caller gave, as subprocess's `env` (not the forkserver's)
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):  # the C level too (gloo, OpenMP), as a subprocess's pipes would
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    if env.get("OMP_NUM_THREADS"):
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:  # sys.exit(n) / sys.exit("message"), as the interpreter reports them
        if isinstance(e.code, int):
            code = e.code
        elif e.code is not None:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_script(
    script: str, argv: list[str], nproc: int = 1, env: dict | None = None, timeout: float = 300, cwd: str = ROOT
) -> subprocess.CompletedProcess:
    """`python script *argv` on `nproc` ranks (torchrun's environment where nproc > 1): the return
    code (the first non-zero rank's, else 0) and the ranks' stdout and stderr, rank 0 first. `env`:
    the whole environment, as subprocess's (None: this process's). A rank that fails stops the
    others after 5 s, as torchrun does; past `timeout` all are killed and subprocess.TimeoutExpired
    raised."""
    env = dict(os.environ if env is None else env)
    if nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for several workers
        env.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
            GROUP_RANK="0", ROLE_WORLD_SIZE=str(nproc), TORCHELASTIC_RESTART_COUNT="0",
        )  # fmt: skip
    ctx = context()
    with tempfile.TemporaryDirectory(prefix="launch") as tmp:
        procs, files = [], []
        for r in range(nproc):
            rank_env = dict(env, RANK=str(r), LOCAL_RANK=str(r), ROLE_RANK=str(r)) if nproc > 1 else env
            out, err = os.path.join(tmp, f"{r}.out"), os.path.join(tmp, f"{r}.err")
            p = ctx.Process(target=_rank, args=(script, list(argv), rank_env, cwd, out, err))
            p.start()
            procs.append(p)
            files.append((out, err))
        deadline, failed_at = time.monotonic() + timeout, None
        try:
            while any(p.exitcode is None for p in procs):
                now = time.monotonic()
                if now > deadline:
                    raise subprocess.TimeoutExpired([script, *argv], timeout)
                if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                    failed_at = now
                if failed_at is not None and now - failed_at > 5:
                    break
                wait([p.sentinel for p in procs if p.exitcode is None], timeout=0.1)
        finally:
            for p in procs:
                if p.exitcode is None:
                    p.kill()
                    p.join()

        def read(path):
            with open(path, errors="replace") as f:
                return f.read()

        stdout = "".join(read(o) for o, _ in files)
        stderr = "".join(read(e) for _, e in files)
    codes = [p.exitcode for p in procs]  # a rank stopped by us: negative; one that failed: its own code
    code = next((c for c in codes if c > 0), next((c for c in codes if c), 0))
    return subprocess.CompletedProcess([script, *argv], code, stdout, stderr)
