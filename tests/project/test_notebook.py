"""notebooks/quickstart.ipynb runs headless from top to bottom, draws its curves and shows the lambda_D/lambda_U line."""

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"
KERNEL = "python3"
CELL_TIMEOUT = 300


def _ensure_kernelspec() -> str:
    """The `python3` kernel; registered for this interpreter (user install) when no kernelspec provides it."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        from ipykernel.kernelspec import install

        install(user=True, kernel_name=KERNEL)
    return KERNEL


def _texts(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    data = output.get("data", {})
    return data.get("text/plain", "") if output.get("output_type") in ("execute_result", "display_data") else ""


def test_notebook_is_saved_without_heavy_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == KERNEL
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs"), "clear the notebook's outputs before committing it"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch, tiny_default):
    # `tiny_default` builds (or finds) the cached model first, so the notebook itself only loads it.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel must use its inline backend to emit PNGs
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=_ensure_kernelspec(),
        timeout=CELL_TIMEOUT,
        allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory: outputs land in tmp
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no inline plot (image/png output)"
    text = "\n".join(_texts(o) for o in outputs)
    assert "lambda_D=" in text and "lambda_U=" in text, "the trainer's loss-aversion printout is missing"
    match = re.search(r"held-out greedy accuracy: ([\d.]+)% before KTO -> ([\d.]+)% after", text)
    assert match, "the before/after accuracy line is missing"
    before, after = map(float, match.groups())
    assert after > before, f"KTO made the quickstart model worse: {before}% -> {after}%"
