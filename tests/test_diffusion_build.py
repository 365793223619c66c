"""tools/notebook.py with a family package (helpers/diffusion/): imports, embedding, taught cells, setup cell."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
import notebook as build_tool  # tools/notebook.py


def test_imports_of_a_family_package_are_resolved_to_its_files():
    code = ("from helpers import metrics\nfrom helpers.diffusion import evaluate as ev\n"
            "from helpers.diffusion.model import Denoiser\nimport helpers.diffusion.sample\n")
    assert build_tool.helper_imports(code) == {"metrics", "diffusion", "diffusion/evaluate",
                                               "diffusion/model", "diffusion/sample"}
    inside = "from .schedule import q_sample\nfrom ..training import History\nfrom .. import metrics\n"
    assert build_tool.helper_imports(inside, "diffusion") == {"diffusion/schedule", "training", "metrics"}


def test_a_notebook_embeds_the_family_modules_it_imports_and_theirs_in_turn():
    files = build_tool.embedded_modules(["from helpers.diffusion.train import DenoiserPlan"])
    assert files[0] == "__init__.py"
    for needed in ("diffusion/__init__.py", "diffusion/train.py", "diffusion/schedule.py", "training.py",
                   "environment.py"):
        assert needed in files, (needed, files)
    assert "diffusion/evaluate.py" not in files and "gan/model.py" not in files


def test_taught_cells_of_a_family_module_name_it_and_fit_a_colab_line():
    code = build_tool.taught_cell("diffusion/schedule: q_sample")
    header = code.splitlines()[0]
    assert header.startswith("# Also in helpers/diffusion/schedule.py: ") and len(header) <= build_tool.MAX_LINE
    assert build_tool.parse_taught_cell(code)[0] == "diffusion/schedule"
    assert "def q_sample(" in code


def test_the_setup_cell_unpacks_a_family_package_into_its_folder(tmp_path, run_setup_cell):
    files = ["__init__.py", "diffusion/__init__.py", "diffusion/schedule.py"]
    source = build_tool.setup_cell({}, files)
    assert ".parent.mkdir(exist_ok=True)" in source
    assert ".parent.mkdir" not in build_tool.setup_cell({}, ["__init__.py", "environment.py"])
    namespace = run_setup_cell(source)
    unpacked = namespace["HELPERS_ROOT"] / "helpers" / "diffusion" / "schedule.py"
    assert unpacked.read_text() == (ROOT / "helpers" / "diffusion" / "schedule.py").read_text()
    import helpers.diffusion.schedule as schedule  # noqa: E402
    assert schedule.__file__.startswith(str(tmp_path))
