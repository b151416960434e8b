"""Import and show_config without a GPU and without the compiled module; the CLI; clear errors."""

import os
import subprocess
import sys

import pytest
import torch

import esp_kernels as esp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Makes `import esp_kernels._C` fail as on a machine where the extension was never built.
_HIDE_C = """
import importlib.abc, sys
class _NoC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "esp_kernels._C":
            raise ModuleNotFoundError("No module named 'esp_kernels._C'", name=name)
sys.meta_path.insert(0, _NoC())
"""


def _run(code, env_extra=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES="")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)


def test_show_config_runs():
    text = esp.show_config()
    for key in ("version", "commit", "compiled_module", "cuda_archs", "devices", "torch",
                "triton"):
        assert key in text
    assert esp.__version__ == esp.config()["version"]


def test_import_without_compiled_module_and_gpu():
    code = _HIDE_C + """
import torch, esp_kernels as esp
cfg = esp.config()
assert cfg["compiled_module"].startswith("absent"), cfg
assert cfg["devices"] == "no CUDA device", cfg
esp.show_config()
# CPU paths still work
o = torch.randn(3, 2, 8); l = torch.randn(3, 2)
esp.merge_states(o, l, o, l)
print("OK")
"""
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout and "compiled_module" in res.stdout


def test_gpu_op_without_compiled_module_names_what_is_missing():
    code = _HIDE_C + """
from esp_kernels import _core
try:
    _core.require_compiled("decode_partial")
except RuntimeError as e:
    print("ERR", e)
"""
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert "ERR" in res.stdout and "esp_kernels._C" in res.stdout and "nvcc" in res.stdout


def test_cli_show_config():
    res = _run("import runpy, sys; sys.argv = ['esp_kernels', 'show-config']; "
               "runpy.run_module('esp_kernels', run_name='__main__')")
    assert res.returncode == 0, res.stderr
    assert "compiled_module" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_cuda_backend_on_cpu_tensors_is_rejected():
    o, l = torch.randn(3, 2, 8), torch.randn(3, 2)
    with pytest.raises(ValueError, match="CUDA"):
        esp.merge_states(o, l, o, l, backend="cuda")


def test_commit_names_a_checkout_whose_tracked_files_differ_from_head(tmp_path):
    # A tree copied onto another machine can carry a stale .git: its HEAD alone would name code
    # that did not run, so show-config marks it.
    from esp_kernels.config import _git_commit

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "f.txt").write_text("a\n")
    for cmd in (["init", "-q"], ["add", "f.txt"], ["commit", "-qm", "one"]):
        subprocess.run(git + cmd, cwd=tmp_path, check=True, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, check=True,
                          capture_output=True, text=True).stdout.strip()
    assert _git_commit(str(tmp_path)) == head
    (tmp_path / "untracked.txt").write_text("x\n")
    assert _git_commit(str(tmp_path)) == head
    (tmp_path / "f.txt").write_text("b\n")
    assert _git_commit(str(tmp_path)) == head + "-modified"
