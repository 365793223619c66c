"""House rules every notebook keeps (GUIDE.md): built from its source, self-contained, taught code as cells."""
import ast
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
import notebook as build_tool  # tools/notebook.py

MANIFEST = build_tool.manifest()
NAMES = sorted(MANIFEST)
MAX_CELL_LINES = 40  # "one job per cell": the parameters and setup cells are exempt


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)


def code_cells(name: str) -> list[str]:
    return [c.source for c in read(name).cells if c.cell_type == "code"]


def taught_cells(name: str) -> list[tuple[str, str]]:
    return [parsed for source in code_cells(name) if (parsed := build_tool.parse_taught_cell(source))]


def test_every_notebook_is_in_the_manifest_and_has_a_source():
    on_disk = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert on_disk == NAMES, "add the notebook to notebooks/notebooks.toml (or delete the stray .ipynb)"
    assert len(NAMES) == 7


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_equals_its_build(name):
    diffs = build_tool.differences([name])
    assert not diffs, f"run `python tools/notebook.py build {name}`:\n{diffs.get(name)}"


@pytest.mark.parametrize("name", NAMES)
def test_taught_cells_equal_their_helpers(name):
    cells = taught_cells(name)
    for module, code in cells:
        defined = [node.name if hasattr(node, "name") else node.targets[0].id for node in ast.parse(code).body]
        assert code == build_tool.definitions(module, defined), (
            f"{name}: the cell holding {defined} differs from helpers/{module}.py; edit helpers/{module}.py "
            "(or the cell, then copy it there) and rebuild")


@pytest.mark.parametrize("name", NAMES)
def test_the_notebook_uses_its_cells_not_the_helpers_behind_them(name):
    """Editing a taught cell must change what the notebook runs: no other cell reaches past it."""
    others = "\n".join(s for s in code_cells(name) if not build_tool.parse_taught_cell(s))
    for path, code in taught_cells(name):
        module = path.replace("/", r"\.")  # diffusion/model -> diffusion\.model
        last = path.rpartition("/")[2]  # what `from helpers.diffusion import model as m` would call it
        for node in ast.parse(code).body:
            defined = node.name if hasattr(node, "name") else node.targets[0].id
            for called in {module, last}:
                assert not re.search(rf"\b{called}\.{defined}\b", others), f"{name} calls {path}.{defined}"
            imports = re.findall(rf"from helpers\.{module} import \(?([^)]*?)\)?$", others, re.M | re.S)
            assert defined not in re.findall(r"\w+", " ".join(imports)), f"{name} imports {defined} again"


@pytest.mark.parametrize("name", NAMES)
def test_embedded_helpers_equal_the_repository(name):
    setup = code_cells(name)[0]
    files = build_tool.decode_helpers(build_tool.embedded_payload(setup))
    assert "__init__.py" in files and len(files) >= 3
    for filename, text in files.items():
        assert text == (ROOT / "helpers" / filename).read_text(), f"{name}: embedded {filename} is stale; rebuild"


@pytest.mark.parametrize("name", NAMES)
def test_setup_cell_is_first_collapsed_and_never_clones(name):
    cell = next(c for c in read(name).cells if c.cell_type == "code")
    assert cell.source.startswith("#@title Setup") and cell.metadata.get("cellView") == "form"
    assert "git clone" not in "\n".join(code_cells(name)) and build_tool.REPOSITORY not in cell.source


def test_embedding_round_trips_and_the_setup_cell_unpacks_it(tmp_path, run_setup_cell):
    source = build_tool.setup_cell({}, ["__init__.py", "environment.py"])
    encoded = build_tool.embedded_payload(source)
    assert build_tool.decode_helpers(encoded)["environment.py"] == (ROOT / "helpers/environment.py").read_text()
    namespace = run_setup_cell(source)
    assert namespace["HELPERS_ROOT"].parent == tmp_path / ".genimg-helpers"
    assert sys.modules["helpers"].__file__.startswith(str(tmp_path))


def test_build_refuses_a_taught_cell_that_uses_a_name_never_imported(tmp_path, monkeypatch):
    source = tmp_path / "x.py"
    source.write_text("# %% [markdown]\n# # 99 · X\n\n# %% SETUP\n\n# %%\nimport torch\n\n"
                      "# %% [helpers] gan/model: Discriminator\n")
    monkeypatch.setattr(build_tool, "NOTEBOOKS", tmp_path)
    with pytest.raises(build_tool.BuildError, match="uses IMAGE_PIXELS, Sequence, Tensor, nn, which no earlier"):
        build_tool.build("99_x", {"source": "x.py"})


def test_01_and_02_are_built_from_one_source():
    assert MANIFEST["01_mnist_gan"]["source"] == MANIFEST["02_fashion_mnist_gan"]["source"]
    assert MANIFEST["01_mnist_gan"]["text"]["DATASET"] == "MNIST"
    assert MANIFEST["02_fashion_mnist_gan"]["text"]["DATASET"] == "FashionMNIST"


@pytest.mark.parametrize("name", NAMES)
def test_skeleton_title_numbered_sections_and_the_two_closing_sections(name):
    cells = read(name).cells
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith(f"# {name[:2]} · ")
    assert build_tool.badge(name) in cells[0].source
    headings = [line for c in cells if c.cell_type == "markdown" for line in c.source.splitlines()
                if line.startswith("## ")]
    numbered = [int(m[1]) for h in headings if (m := re.match(r"## (\d+)\. ", h))]
    assert numbered and numbered == list(range(1, len(numbered) + 1)), f"{name}: sections {numbered}"
    closing = ["## What to take away", "## Check your understanding", "## What to try next"]
    assert headings[-3:] == closing, headings[-3:]
    last_numbered = [h for h in headings if re.match(r"## \d+\. ", h)][-1]
    assert last_numbered.endswith(". Under the hood (optional)"), last_numbered


@pytest.mark.parametrize("name", NAMES)
def test_cells_are_short_and_lines_fit_colab(name):
    for source in code_cells(name)[1:]:
        long = [line for line in source.splitlines() if len(line) > build_tool.MAX_LINE]
        assert not long, f"{name}: {len(long)} line(s) over {build_tool.MAX_LINE} characters: {long[0]!r}"
        if "SMOKE = smoke_mode()" not in source:
            n = len(source.splitlines())
            assert n <= MAX_CELL_LINES, f"{name}: a {n}-line cell (one job per cell): {source[:80]!r}"


@pytest.mark.parametrize("name", NAMES)
def test_stored_without_outputs_with_asserts_and_a_metrics_file(name):
    for cell in read(name).cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: rebuild to strip outputs"
    source = "\n".join(code_cells(name))
    assert "assert " in source, "with outputs stripped, nbval only sees exceptions: checks must be asserts"
    assert "write_metrics(" in source and "smoke_mode()" in source
    assert "RUN_DIR_ON_DRIVE" in source and "use_drive_for_runs(RUN_DIR_ON_DRIVE)" in source


def test_no_show_source_is_left():
    for path in [*(ROOT / "helpers").glob("*.py"), *(ROOT / "notebooks").glob("*.py")]:
        assert "show_source" not in path.read_text(), f"{path.name} still shows source instead of a cell"


def test_readme_badges_come_from_the_one_repository_constant():
    readme = (ROOT / "README.md").read_text()
    urls = re.findall(r"https://colab\.research\.google\.com/github/[^)\s]+", readme)
    assert sorted(urls) == sorted(re.search(r"\((https://colab[^)]+)\)$", build_tool.badge(n))[1] for n in NAMES)


ROLE_NAMES = {"Generator", "Discriminator"}  # each GAN family's own, in its own model module
FAMILY_OF = {"01": "gan", "02": "gan", "03": "style", "04": "t2i", "05": "pix2pixhd", "06": "sd_lora",
             "07": "diffusion"}
MAX_MODULE_LINES = 350
MAX_CORE_LINES = 1550  # the shared core: every helpers/*.py together (1,498 lines in December 2026)


def helper_modules() -> list[Path]:
    return sorted((ROOT / "helpers").rglob("*.py"))


def family(path: Path) -> str | None:
    """The family package a helpers file belongs to, None for the core."""
    parts = path.relative_to(ROOT / "helpers").parts
    return parts[0] if len(parts) > 1 else None


def test_public_names_mean_one_thing_across_helpers():
    owners: dict[str, list[str]] = {}
    for path in helper_modules():
        for node in ast.parse(path.read_text()).body:
            names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []
            if isinstance(node, ast.Assign):
                names = [target.id for target in node.targets if isinstance(target, ast.Name)]
            for defined in names:
                if not defined.startswith("_") and defined not in ROLE_NAMES:
                    owners.setdefault(defined, []).append(str(path.relative_to(ROOT / "helpers")))
    twice = {name: modules for name, modules in owners.items() if len(modules) > 1}
    assert not twice, f"one name, several definitions: {twice}"


def test_helpers_layout_a_small_core_and_families_that_import_only_the_core_and_themselves():
    families = {p.parent.name for p in (ROOT / "helpers").glob("*/__init__.py")}
    assert set(FAMILY_OF.values()) <= families, sorted(families)
    core_lines = 0
    for path in helper_modules():
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)}: {lines} lines; split it by role"
        own = family(path)
        core_lines += lines if own is None else 0
        imported = build_tool.helper_imports(path.read_text(), own or "")
        foreign = sorted(m for m in imported if m.split("/")[0] in families - {own})
        assert not foreign, f"{path.relative_to(ROOT)} imports another family: {foreign}"
    assert core_lines <= MAX_CORE_LINES, f"the core has grown to {core_lines} lines"


@pytest.mark.parametrize("name", NAMES)
def test_a_notebook_embeds_the_core_and_its_own_family_only(name):
    files = build_tool.decode_helpers(build_tool.embedded_payload(code_cells(name)[0]))
    families = {f.split("/")[0] for f in files if "/" in f}
    assert families == {FAMILY_OF[name[:2]]}, f"{name} embeds {sorted(families)}"


def test_layout_checks_catch_what_they_are_for():
    """The import rule above reads relative and absolute imports alike."""
    code = "from ..t2i.model import Generator\nfrom .train import x\nfrom helpers.gan import model\n"
    assert build_tool.helper_imports(code, "style") >= {"t2i/model", "style/train", "gan/model"}


PROCESS_WORDS = re.compile(r"review session|reviewer|\bREVIEW_|\bissue \d+|before this work|this work\b|"
                           r"earlier version|load average|\bcommit [0-9a-f]{7}", re.I)


def test_no_process_words_in_the_product():
    """Nothing a student or a new maintainer reads in the product speaks of how the project was built."""
    product = [*helper_modules(), *(ROOT / "notebooks").glob("*.py"), ROOT / "notebooks" / "notebooks.toml",
               ROOT / "README.md"]
    found = [f"{p.relative_to(ROOT)}: {m[0]!r}" for p in product for m in PROCESS_WORDS.finditer(p.read_text())]
    assert not found, found[:10]


def test_no_file_patches_the_import_path():
    """helpers is an installed package (pyproject.toml); pytest.ini finds tools/ and experiments/."""
    needle = "sys" + ".path"
    offenders = [str(p.relative_to(ROOT)) for folder in ("helpers", "tools", "tests", "experiments")
                 for p in (ROOT / folder).rglob("*.py") if needle in p.read_text()]
    assert not offenders, offenders


PLACEHOLDER = re.compile(r"\{\{\s*[A-Za-z_]+\s*\}\}|\b[A-Z0-9_]*_TO_COME\b|\bTODO\b|\bFIXME\b|\bTBD\b")


@pytest.mark.parametrize("name", NAMES)
def test_no_unfilled_placeholder_reaches_a_student(name):
    """A build key left as {{KEY}}, a NAME_TO_COME, TODO, FIXME or TBD in any cell is a placeholder shipped to
    every student: numbers the text quotes are filled from the run (display(Markdown(f"..."))) or measured."""
    found = [f"cell {i}: {m.group(0)!r}" for i, cell in enumerate(read(name).cells)
             for m in PLACEHOLDER.finditer(cell.source)]
    assert not found, f"{name} ships placeholders: {found}"


def test_the_placeholder_check_catches_what_it_is_for():
    assert PLACEHOLDER.search("divide the FD by FD_RATIO_TO_COME.") and PLACEHOLDER.search("{{TAKEAWAY}}")
    assert PLACEHOLDER.search("TODO: measure") and not PLACEHOLDER.search("class_XXXXX/image_NNNNN.txt")
    assert not PLACEHOLDER.search("TODOS and todo lists")
