"""The kernel library never imports the fine-tuning application (gallop_kernels.finetune)."""

import subprocess
import sys

# Every library module is imported with the application made unimportable; a library
# module that imports gallop_kernels.finetune (at import time) then fails.
_IMPORT_LIBRARY = """
import importlib, pkgutil, sys
sys.modules["gallop_kernels.finetune"] = None  # import of it or any submodule raises ImportError
import gallop_kernels
names = [m.name for m in pkgutil.walk_packages(gallop_kernels.__path__, "gallop_kernels.")
         if not m.name.startswith("gallop_kernels.finetune")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def test_library_imports_without_the_application():
    proc = subprocess.run([sys.executable, "-c", _IMPORT_LIBRARY], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) >= 8  # the walk really found the library's modules


def test_library_source_does_not_name_the_application():
    """Also catches imports inside functions, which the import test above does not run."""
    from pathlib import Path

    import gallop_kernels

    root = Path(gallop_kernels.__file__).parent
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if "finetune" not in path.relative_to(root).parts and ("finetune" in path.read_text())
    ]
    assert offenders == []
