# Setup (the same cell in every notebook): in Colab, fetch the repository and install only what Colab lacks
# (never torch: Colab's CUDA build stays). Elsewhere it only finds the repository so `helpers` imports.
import sys
from pathlib import Path

REPO_URL = "https://github.com/genimg-notebooks/genimg-notebooks"
if "google.colab" in sys.modules and not Path("genimg-notebooks").is_dir():
    !git clone -q --depth 1 {REPO_URL} genimg-notebooks
    %pip install -q -r genimg-notebooks/requirements-colab.txt
ROOT = next((p for p in (Path.cwd(), *Path.cwd().parents, Path("genimg-notebooks").resolve())
             if (p / "helpers" / "__init__.py").is_file()), None)
assert ROOT is not None, "helpers/ not found: open this notebook from the repository, or run it in Colab"
sys.path.insert(0, str(ROOT))
