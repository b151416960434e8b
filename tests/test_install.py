"""Packaging and command line: the wheel carries its build info and the build leaves the source
tree alone; `python -m esp_kernels` alone prints the help; the README's first command installs
what it needs before running."""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


def source_copy(dst):
    """The tracked files of this checkout (what a fresh clone has), plus its git metadata for the
    commit, copied to dst; returns the commit."""
    files = run(["git", "ls-files", "-z"], cwd=ROOT).stdout.split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            with open(src, "rb") as a, open(os.path.join(dst, rel), "wb") as b:
                b.write(a.read())
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        assert run(cmd, cwd=dst).returncode == 0
    return run(["git", "rev-parse", "--short", "HEAD"], cwd=dst).stdout.strip()


def test_main_without_command_prints_help():
    out = run([sys.executable, "-m", "esp_kernels"], cwd=ROOT,
              env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    assert "usage: python -m esp_kernels" in out.stdout
    for name in ("show-config", "demo"):
        assert name in out.stdout


def test_commands_are_registered_from_a_list():
    from esp_kernels.__main__ import COMMANDS, Command, build_parser

    seen = []
    extra = Command("echo", "test command", lambda args: seen.append(args.word) or 7,
                    lambda p: p.add_argument("word"))
    parser = build_parser(COMMANDS + [extra])
    args = parser.parse_args(["echo", "hi"])
    assert args.run(args) == 7 and seen == ["hi"]


@pytest.mark.slow
def test_wheel_carries_build_info_and_leaves_the_source_alone(tmp_path):
    src = tmp_path / "src"
    commit = source_copy(str(src))
    env = {**os.environ, "ESP_SKIP_CUDA": "1"}
    out = run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
               "-w", str(tmp_path / "whl"), str(src)], env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not (src / "esp_kernels" / "_build_info.py").exists(), \
        "the wheel build wrote into the source tree"
    (wheel,) = (tmp_path / "whl").glob("esp_kernels-*.whl")
    with zipfile.ZipFile(wheel) as z:
        text = z.read("esp_kernels/_build_info.py").decode()
    info = {}
    exec(text, info)
    assert info["BUILD_INFO"]["commit"] == commit
    assert info["BUILD_INFO"]["cuda_archs"] == "none"  # ESP_SKIP_CUDA=1: no _C in this wheel

    # Installed outside any git checkout, show-config reads the wheel's info and agrees with
    # itself (no compiled module, no archs).
    site = tmp_path / "site"
    out = run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
               str(wheel)])
    assert out.returncode == 0, out.stderr
    # A developer machine may hold an editable install of another checkout; its import hook
    # would serve esp_kernels._C from there, so it is left out of this interpreter.
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
            "if '__editable__' not in getattr(f, '__module__', '')]; "
            "import esp_kernels, json; c = esp_kernels.config(); "
            "print(json.dumps([esp_kernels.__file__, c['commit'], c['cuda_archs'], "
            "c['compiled_module']]))")
    out = run([sys.executable, "-c", code], cwd=str(tmp_path),
              env={**os.environ, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    import json

    path, got_commit, archs, compiled = json.loads(out.stdout.strip().splitlines()[-1])
    assert path.startswith(str(site))
    assert got_commit == commit and archs == "none" and compiled.startswith("absent")


@pytest.mark.slow
def test_first_command_installs_then_runs(tmp_path):
    """scripts/run.sh in a new virtual environment on a copy of the tree: it installs the
    package (pure Python here, ESP_SKIP_CUDA=1, to keep the test minutes shorter) and runs the
    command. The venv sees this machine's packages, so torch is not downloaded again."""
    src = tmp_path / "src"
    source_copy(str(src))
    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)]).returncode == 0
    py = str(venv / "bin" / "python")
    env = {**os.environ, "PYTHON": py, "ESP_SKIP_CUDA": "1"}
    env.pop("PYTHONPATH", None)
    out = run(["bash", str(src / "scripts" / "run.sh"), "show-config"], cwd=str(tmp_path), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "compiled_module" in out.stdout and "cuda_archs" in out.stdout
    out = run([py, "-c", "import esp_kernels; print(esp_kernels.__file__)"], cwd=str(tmp_path),
              env=env)
    assert out.stdout.strip().startswith(str(src)), "run.sh did not install the tree it is in"
