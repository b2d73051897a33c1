"""The console script leaves with os._exit after main(): exit handlers still run, output is complete."""
import subprocess
import sys

SCRIPT = """
import atexit, sys, threading
atexit.register(lambda: print("exit handler ran", flush=True))
if sys.argv[1] == "thread":  # a non-daemon thread still working when main() returns
    threading.Thread(target=lambda: (__import__("time").sleep(0.5), print("thread finished", flush=True))).start()
from pipelines.cli import run
sys.argv = ["vaepipe", *sys.argv[2:]]
run()
"""


def _run(*args):
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=120)


def test_quick_exit_keeps_output_exit_handlers_and_the_exit_code():
    done = _run("plain", "models")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "exit handler ran"
    names = {line.split()[0] for line in lines[:-1]}
    assert {"vae", "cvae", "beta_vae", "vae_gan"} <= names

    bad = _run("plain", "train", "--data", "/nonexistent/data", "--model", "vae")
    assert bad.returncode == 2 and "vaepipe: error:" in bad.stderr
    assert bad.stdout.strip().splitlines()[-1] == "exit handler ran"


def test_a_live_non_daemon_thread_gets_the_normal_exit():
    done = _run("thread", "models")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "thread finished" in done.stdout and done.stdout.strip().endswith("exit handler ran")
