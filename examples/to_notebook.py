"""Write quickstart.ipynb from quickstart.py (cells split at "# %%" lines; "# %% [markdown]" cells are markdown).
The tests check that the two agree:  python examples/to_notebook.py"""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cells(script: str) -> list[dict]:
    found = []
    for index, chunk in enumerate(script.split("# %%")[1:]):
        header, _, body = chunk.partition("\n")
        if header.strip() == "[markdown]":
            text = "\n".join(line.removeprefix("# ").removeprefix("#") for line in body.strip().splitlines())
            found.append({"cell_type": "markdown", "id": f"cell-{index}", "metadata": {}, "source": text})
        else:
            found.append({"cell_type": "code", "id": f"cell-{index}", "metadata": {}, "execution_count": None,
                          "outputs": [], "source": body.strip()})
    return found


def notebook(script: str) -> dict:
    return {"cells": cells(script), "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


if __name__ == "__main__":
    text = json.dumps(notebook((HERE / "quickstart.py").read_text()), indent=1) + "\n"
    (HERE / "quickstart.ipynb").write_text(text)
