"""Run Python in a fresh interpreter that cannot import the repository (isolated mode, empty cwd)."""

import os
import subprocess
import sys
import textwrap

GUARD = textwrap.dedent(
    """
    import importlib.util, sys
    for _name in ("modeling_protllm", "configuration_protllm", "processing_protllm"):
        assert importlib.util.find_spec(_name) is None, f"{_name} is importable: the repository leaked into sys.path"
    """
)


def run_fresh_python(script: str, cwd, timeout: int = 300) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-I", "-c", GUARD + textwrap.dedent(script)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"fresh process failed (rc={result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result.stdout


def kill_when_printed(args, marker: str, cwd, env) -> None:
    """Start `args`, wait until it prints a line containing `marker` (it then hangs mid-write), SIGKILL it."""
    import signal

    process = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = ""
    while marker not in line:  # tqdm writes \r-separated bars on the same line
        line = process.stdout.readline()
        assert line or process.poll() is None, f"the child ended before printing {marker}"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
