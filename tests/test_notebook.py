"""notebooks/quickstart.ipynb runs top to bottom on CPU (as `jupyter nbconvert --execute` would)
and shows its plot."""
from __future__ import annotations

import os
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def _ensure_python3_kernel():
  from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
  try:
    KernelSpecManager().get_kernel_spec("python3")
  except NoSuchKernel:
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user"], check=True)


def test_quickstart_notebook_runs_and_plots(monkeypatch):
  _ensure_python3_kernel()
  # The kernel is a fresh process: one CPU device (not conftest's 8 fakes), the checkout on the
  # path so the install cell sees opsd_jax importable and installs nothing.
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": os.path.join(REPO, "notebooks")}})
  try:
    client.execute()
  except CellExecutionError as e:
    pytest.fail(f"the notebook failed:\n{str(e)[-3000:]}")

  code_cells = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count for c in code_cells), "a cell did not run"
  errors = [o for c in code_cells for o in c.outputs if o.output_type == "error"]
  assert not errors
  text = "".join(o.get("text", "") for c in code_cells for o in c.outputs
                 if o.output_type == "stream")
  assert "git clone" not in text and "Successfully installed" not in text  # nothing installed
  assert "SFT loss" in text and "| after one step of each |" in text
  first, last = map(float, text.split("SFT loss ")[1].split("\n")[0].split(" -> "))
  assert last < first - 1.0, (first, last)  # SFT learned something
  # the GRPO and the OPSD step each applied an update (printed metrics: learning rate > 0)
  rates = [float(line.split("'learning_rate': ")[1].split(",")[0])
           for line in text.splitlines() if "'learning_rate': " in line]
  assert len(rates) == 2 and all(r > 0 for r in rates), rates
  last = code_cells[-1]
  assert any("image/png" in o.get("data", {}) for o in last.outputs), "no plot in the last cell"
