"""A wheel built from the checkout, installed in a fresh venv elsewhere, runs the console scripts.

The venv gets only the wheel (`--no-deps`); a .pth file lends it the dependencies of the venv
running the tests, so no torch is reinstalled and nothing is downloaded, while `bitnet_train`
itself can only come from the wheel (PYTHONPATH is cleared, the working directory is outside
the checkout, and the test asserts where the package was imported from). This proves what a
`pip install bitnet-train` user gets: the configs and recipes inside the package, the entry
points, the exporters.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def build_wheel(dest: Path) -> Path:
    """Build the wheel from a copy of what the sdist would hold (pyproject, README, package),
    so the build leaves nothing in the checkout."""
    src = dest / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "bitnet_train", src / "bitnet_train",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = dest / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                    "--no-build-isolation", "-w", str(dist), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("bitnet_train-*.whl")
    return wheel


def fresh_venv(root: Path, wheel: Path) -> tuple[Path, dict[str, str]]:
    """A venv with the wheel installed and this interpreter's site-packages lent by a .pth."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True).stdout
    lent = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site.strip()) / "lent_dependencies.pth").write_text("\n".join(sorted(lent)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True,
                   timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", WANDB_MODE="offline",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return venv, env


@pytest.mark.slow
def test_wheel_trains_and_exports_outside_the_checkout(tmp_path):
    wheel = build_wheel(tmp_path / "build")
    venv, env = fresh_venv(tmp_path, wheel)
    work = tmp_path / "elsewhere"
    work.mkdir()
    bin_ = venv / "bin"

    where = _run([str(bin_ / "python"), "-c", "import bitnet_train; print(bitnet_train.__file__)"],
                 work, env)
    assert where.strip().startswith(str(venv)), where  # the wheel's copy, not the checkout

    # the recipes ship inside the package; data and tokenizer from the demo's own writer
    _run([str(bin_ / "bitnet-demo"), "--data-only", "--out", "demo"], work, env)
    env_demo = dict(env, BITNET_DEMO_DIR=str(work / "demo"))
    _run([str(bin_ / "bitnet-train"), "+recipe=demo_pretrain", "trainer.max_steps=5",
          "output_dir=run"], work, env_demo)
    final = work / "run" / "final"
    assert (final / "model.safetensors").is_file() and (work / "run" / "config.yaml").is_file()

    _run([str(bin_ / "bitnet-export"), "run/final", "--format", "gguf", "--out", "model.gguf"],
         work, env)
    _run([str(bin_ / "bitnet-export"), "run/final", "--format", "hf", "--out", "hf"], work, env)
    assert (work / "model.gguf").stat().st_size > 1_000_000
    (work / "probe").write_text("x")  # the mode a plain open() gives here
    plain = stat.S_IMODE((work / "probe").stat().st_mode)
    for f in (final / "model.safetensors", work / "hf" / "model.safetensors", work / "model.gguf"):
        assert stat.S_IMODE(f.stat().st_mode) == plain, f

    # a config directory of the user's own joins the search path
    mine = work / "my_configs" / "recipe"
    mine.mkdir(parents=True)
    (mine / "tiny_run.yaml").write_text("# @package _global_\ndefaults:\n  - demo_pretrain\n"
                                        "trainer:\n  max_steps: 3\n")
    job = _run([str(bin_ / "bitnet-train"), "--config-dir", "my_configs", "+recipe=tiny_run",
                "--cfg", "job"], work, env_demo)
    assert "max_steps: 3" in job and "hidden_size: 256" in job
