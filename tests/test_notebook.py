"""The quickstart notebook runs top to bottom, offline."""

import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_executes(tmp_path):
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "geta_quickstart.ipynb"), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "QADG of BertForQuestionAnswering" in outputs
    assert "max |reloaded - compressed|" in outputs and "| BOPs |" in outputs
