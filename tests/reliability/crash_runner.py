"""Run a tiny pretraining run again and again, killing it with SIGKILL at chosen points.

    python -m tests.reliability.crash_runner SPEC.json      (cwd: the repository root)

SPEC: {"corpus": DIR, "overrides": [...], "runs": [{"name", "workdir", "launches": [KILL|null]}]}
Each launch is a real process (forked from this one, which imported torch & co once, so a
launch costs about a second instead of five) running `bitnet_train.train.run.run` with
`trainer.resume=auto` in `workdir`. KILL is one of

    {"kind": "call", "target": T, "nth": N}   SIGKILL on the N-th call of target T, where T is
        optimizer_step     inside a training step, after backward, before the update
        model_file         after accelerate wrote model.safetensors, half of it cut away
        torch_save         after a torch.save (optimizer, RNG, data or trainer state), half cut
        hash               while the background thread hashes checkpoint files
        complete           after the fsyncs, before the COMPLETE marker
        publish            after COMPLETE, before the rename that publishes the checkpoint
        final_file         while final/ is written (its model.safetensors half written)
        final_rename       with final/ complete in its temporary directory, before the rename
    {"kind": "time", "after_step": S, "delay": D}   SIGKILL D seconds after the launch finished
        its S-th step (wherever it is then)

Every training step appends {"run", "launch", "step", "loss"} to WORKDIR/losses.jsonl (one
atomic write per line). The results (how each launch ended) go to SPEC.json's sibling
results.json.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _cut_half(path: str | Path) -> None:
    size = os.path.getsize(path)
    os.truncate(path, size // 2)


def _install_kill(kill: dict) -> None:
    """Patch the target so that its nth call (in this process) kills the process."""
    import accelerate.utils.other as acc_other
    import torch

    import bitnet_train.export.hf as hf_writer  # writes final/ (save_model -> write_master)
    import bitnet_train.integrity as integrity
    import bitnet_train.train.checkpoint as ckpt

    target, nth = kill["target"], kill["nth"]
    calls = [0]

    def due() -> bool:
        calls[0] += 1
        return calls[0] == nth

    if target == "optimizer_step":
        orig_step = torch.optim.AdamW.step

        def step(self, *a, **k):
            if due():
                _die()
            return orig_step(self, *a, **k)

        torch.optim.AdamW.step = step
    elif target == "model_file":
        orig_safe = acc_other.safe_save_file

        def safe(obj, f, *a, **k):
            orig_safe(obj, f, *a, **k)
            if due():
                _cut_half(f)
                _die()

        acc_other.safe_save_file = safe
    elif target == "torch_save":
        orig_save = torch.save

        def save(obj, f, *a, **k):
            orig_save(obj, f, *a, **k)
            if isinstance(f, str | os.PathLike) and due():
                _cut_half(f)
                _die()

        torch.save = save
    elif target == "hash":
        orig_hash = integrity.hash_file

        def hash_file(path, *a, **k):
            if due():
                _die()
            return orig_hash(path, *a, **k)

        integrity.hash_file = hash_file
    elif target == "complete":
        orig_write = ckpt._write_synced

        def write_synced(path, text):
            if Path(path).name == ckpt.COMPLETE and due():
                _die()
            return orig_write(path, text)

        ckpt._write_synced = write_synced
    elif target == "publish":
        orig_rename = os.rename

        def rename(src, dst, *a, **k):
            if re.fullmatch(r"step_\d+", Path(dst).name) and due():
                _die()
            return orig_rename(src, dst, *a, **k)

        os.rename = rename
    elif target == "final_file":
        orig_file = hf_writer.save_file

        def save_file(tensors, filename, *a, **k):
            orig_file(tensors, filename, *a, **k)
            if ".final.tmp-" in str(filename) and due():
                _cut_half(filename)
                _die()

        hf_writer.save_file = save_file
    elif target == "final_rename":
        orig_rename = os.rename  # bitnet_train.atomic publishes a directory with os.rename

        def rename(src, dst, *a, **k):
            if Path(dst).name == "final" and ".final.tmp-" in str(src) and due():
                _die()
            return orig_rename(src, dst, *a, **k)

        os.rename = rename
    else:
        raise ValueError(f"unknown kill target {target!r}")


def _child(spec: dict, run_spec: dict, launch: int, kill: dict | None) -> None:
    import torch

    from bitnet_train.train.run import run
    from bitnet_train.train.trainer import Trainer
    from tests.train.helpers import pretrain_config

    torch.set_num_threads(1)
    workdir = Path(run_spec["workdir"])
    log_fd = os.open(workdir / "losses.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    train_step = Trainer.train_step

    def recorded(self):
        result = train_step(self)
        if result is not None:
            line = json.dumps({"run": run_spec["name"], "launch": launch, "step": result.step,
                               "loss": result.metrics["loss"]})
            os.write(log_fd, (line + "\n").encode())  # one write: a kill never tears a line
        return result

    Trainer.train_step = recorded
    if kill is not None and kill["kind"] == "call":
        _install_kill(kill)
    run(pretrain_config(workdir, Path(spec["corpus"]), *spec["overrides"]))


def _steps_done(workdir: Path, launch: int) -> int:
    path = workdir / "losses.jsonl"
    if not path.exists():
        return 0
    done = 0
    for line in path.read_text().splitlines():
        try:
            done += json.loads(line)["launch"] == launch
        except json.JSONDecodeError:  # a line being written as we read
            pass
    return done


def _launch(spec: dict, run_spec: dict, launch: int, kill: dict | None) -> str:
    pid = os.fork()
    if pid == 0:  # the child: train, then leave without running the parent's cleanup
        code = 0
        try:
            _child(spec, run_spec, launch, kill)
        except BaseException:  # noqa: BLE001 - reported through the exit status
            traceback.print_exc()
            code = 3
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    if kill is not None and kill["kind"] == "time":
        workdir = Path(run_spec["workdir"])
        while _steps_done(workdir, launch) < kill["after_step"]:
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                return "exit before the kill"
            time.sleep(0.005)
        time.sleep(kill["delay"])
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    # Import everything once, before any fork; nothing here may start threads or touch torch's
    # thread pools (the children do, each for itself).
    import torch._dynamo  # noqa: F401 - imported lazily by the first optimizer: ~1.5 s
    import transformers  # noqa: F401

    import bitnet_train.data.pretrain  # noqa: F401
    import bitnet_train.data.tokenizer  # noqa: F401
    import bitnet_train.io  # noqa: F401
    import bitnet_train.train.run  # noqa: F401
    import tests.train.helpers  # noqa: F401

    results: dict[str, list[dict]] = {}
    for run_spec in spec["runs"]:
        results[run_spec["name"]] = []
        for i, kill in enumerate(run_spec["launches"]):
            t0 = time.perf_counter()
            status = _launch(spec, run_spec, i, kill)
            results[run_spec["name"]].append({
                "kill": kill, "status": status, "seconds": round(time.perf_counter() - t0, 2),
                "steps": _steps_done(Path(run_spec["workdir"]), i)})
    Path(spec_path).with_name("results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
