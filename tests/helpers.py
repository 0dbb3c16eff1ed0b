"""What several test files need: the repository's paths, the environment of a process a test starts, a free port,
and the overrides of a tiny training run. Imported as `helpers` (tests/ is on the import path of every test)."""
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DIST = TESTS / "dist"  # the scripts the process tests run (under torchrun or alone)

# A process a test starts must not think it is a rank of a job the test itself runs in (pytest under torchrun,
# or a restarted agent): these are cleared from its environment.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT")


def process_env(**extra: str) -> dict:
    """The environment of a clipkit process a test starts: one intra-op thread each (several run at once on a
    small machine), torch.compile's code generation in the process itself (no pool of compile workers, each
    importing torch, beside the jobs the other test worker runs), offline, unbuffered output, no inherited rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    for key in RANK_VARIABLES:
        env.pop(key, None)
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port free on localhost now (for a service or a rendezvous the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_run(run_dir, synth, *extra: str, steps: int = 2, batch: int = 8, zeroshot: bool = False) -> list[str]:
    """The overrides of a short clipkit-nano run on the synthetic shards: no progress bar, no loader workers,
    a small shuffle buffer, no report.html (its own tests ask for one), no evaluation at the end unless asked;
    `extra` overrides come last (they win)."""
    overrides = [f"run.dir={run_dir}", f"data.train={synth.train_spec}", "model.name=clipkit-nano",
                 f"train.global_batch_size={batch}", f"train.steps={steps}", "train.warmup_steps=1",
                 "run.progress=false", "data.workers=0", "data.shuffle_buffer=20", "run.report=false"]
    if zeroshot:
        overrides.append(f"data.zeroshot={synth.eval_root}")
    else:
        overrides.append("eval.zeroshot_at_end=false")
    return [*overrides, *extra]


@contextmanager
def serving(app):
    """`app` under uvicorn in a thread, on a port the kernel picks on 127.0.0.1; yields the port."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
