"""examples/quickstart.ipynb runs top to bottom on the embedded model (so the README's "From Python" cannot rot),
and it is the same code as examples/quickstart.py."""
import json
import sys

import pytest

from util.globals import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
from to_notebook import notebook  # noqa: E402


def test_notebook_is_the_script():
    written = json.loads((EXAMPLES / "quickstart.ipynb").read_text())
    assert written == notebook((EXAMPLES / "quickstart.py").read_text()), \
        "quickstart.ipynb differs from quickstart.py: run python examples/to_notebook.py"


@pytest.mark.real_model
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    monkeypatch.setenv("KE_STATS_DIR", str(tmp_path / "stats"))  # the kernel inherits it: C0 computed afresh
    monkeypatch.setenv("KE_NO_DOWNLOAD", "1")
    book = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(book, timeout=1200, kernel_name="python3",
                            resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    text = "".join(output.get("text", "") for cell in book.cells if cell.cell_type == "code"
                   for output in cell.outputs)
    assert "3 facts written" in text and "after batch 2: 6 edits" in text
    after = next(json.loads(line[len("after "):]) for line in text.splitlines() if line.startswith("after {"))
    before = next(json.loads(line[len("before "):]) for line in text.splitlines() if line.startswith("before {"))
    assert after["ES"] > before["ES"] and after["GES"] >= before["GES"]
    assert "edited model: 'The mother tongue of Danielle Darrieux is' -> " in text
