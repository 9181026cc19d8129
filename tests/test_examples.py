"""The examples run as a user runs them: the notebook in a real Jupyter kernel, the script in a
process of its own."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, run_python

EXAMPLES = os.path.join(REPO, "examples")


def test_the_notebook_runs_in_a_jupyter_kernel(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = nbformat.read(os.path.join(EXAMPLES, "transfer_notebook.ipynb"), as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    outputs = "".join(
        out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", [])
    )
    # The notebook's own asserts held; what it printed says so.
    assert "BatchNorm moving statistics bit-identical through both phases: 4 variables" in outputs
    assert "epochs seen by the callback: [0, 1, 2, 3, 4, 5, 6, 7]" in outputs
    assert "| train | training=True | training=False | training=True |" in outputs
    assert os.path.isfile(tmp_path / "runs" / "notebook" / "export" / "model.keras")


def test_the_text_backbone_script_transfers_and_serves_token_ids(tmp_path):
    done = run_python(os.path.join(EXAMPLES, "text_backbone.py"), f"--workdir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["eval_examples"] == 301
    assert result["eval_accuracy"]["finetune"] > result["chance"] + 0.3
    # The encoder's Dropout runs in training mode in the fine-tune train step, not in the head's.
    head, finetune = result["modes"].split("phase 2")
    assert "| train | training=True | training=False | training=True |" in head
    assert "| train | training=True | training=True | training=True |" in finetune
    # The export serves what the backbone takes: a dict of token ids, no pixels.
    serve = tf.saved_model.load(result["saved_model"]).signatures["serving_default"]
    tokens = np.random.default_rng(0).integers(30, 64, (4, 12)).astype("int32")
    probabilities = serve(tokens=tf.constant(tokens))["probabilities"].numpy()
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
