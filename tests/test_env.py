"""The package imports and works without its compiled extension; backends() says so."""

import os
import subprocess
import sys

import pytest
import torch

import gallop_kernels as gk
from gallop_kernels import _ext

SCRIPT = """
import torch, gallop_kernels as gk
print(gk.backends())
m = torch.nn.Linear(8, 4)
m(torch.randn(3, 8)).sum().backward()
sel = gk.select_mask(m, rho=0.25)
gk.SparseAdamW(m.named_parameters(), selection=sel, lr=0.1).step()
print("ok", sel.num_selected)
"""


def test_works_without_the_extension():
    env = dict(os.environ, GALLOP_KERNELS_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "'host': False" in out.stdout and "'cuda': False" in out.stdout
    assert out.stdout.strip().endswith("ok 9")  # round(0.25 * 36)


def test_require_ext_explains_why(monkeypatch):
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_IMPORT_ERROR", ImportError("no module named gallop_kernels._C"))
    with pytest.raises(RuntimeError, match=r"sparse_adamw needs the compiled extension.*no module named.*pip install"):
        _ext.require_ext("sparse_adamw")


def test_backends_report():
    b = gk.backends()
    assert b["reference"] is True
    assert set(b) == {"reference", "triton", "host", "cuda"}
    assert b["host"] == (_ext._C is not None)
    assert set(gk.why_unavailable()) == {name for name, ok in b.items() if not ok}


def test_triton_backend_without_device_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device runs Triton")
    m = torch.nn.Linear(4, 2)
    m(torch.randn(1, 4)).sum().backward()
    with pytest.raises(ValueError, match="backend='triton' needs a CUDA device"):
        gk.select_mask(m, rho=0.5, backend="triton")


def test_package_names_and_submodules_load_on_first_use():
    code = (
        "import sys, gallop_kernels as gk; assert 'torch' not in sys.modules; "
        "assert gk.radix.DEFAULT.chunk > 0 and callable(gk.select_mask) and 'torch' in sys.modules; "
        "missing = False\n"
        "try: gk.no_such_name\n"
        "except AttributeError: missing = True\n"
        "assert missing; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
