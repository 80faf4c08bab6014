"""The services' OpenMP spin count must be in the environment before torch loads libgomp
(libgomp reads it once, at load): a later import that reaches torch made it a no-op once."""

import os
import subprocess
import sys

import pytest

from specmesh.model_service import openmp

PROBE = """
import runpy, sys
sys.argv = ["{module}", "--help"]
try:
    runpy.run_module("{module}", run_name="__main__")
except SystemExit:
    pass
from specmesh.model_service import openmp
print("applied_before_torch", openmp.applied_before_torch, "torch" in sys.modules)
"""


@pytest.mark.parametrize("module", ["specmesh.verify_service", "specmesh.draft_service"])
def test_service_sets_spin_count_before_torch_loads(module):
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    # tune_openmp ran while torch was unloaded, and torch did load afterwards (the probe
    # would pass vacuously if the service never imported it)
    assert out.strip().splitlines()[-1] == "applied_before_torch True True"


def test_openmp_module_does_not_import_torch():
    code = "import sys; import specmesh.model_service.openmp; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "False"


def test_tune_openmp_keeps_a_users_setting(monkeypatch):
    monkeypatch.setenv("GOMP_SPINCOUNT", "123")
    openmp.tune_openmp()
    assert os.environ["GOMP_SPINCOUNT"] == "123"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    openmp.tune_openmp()
    assert os.environ["GOMP_SPINCOUNT"] == openmp.GOMP_SPINCOUNT
