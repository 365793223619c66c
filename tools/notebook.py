"""Build the notebooks from their percent-format sources; check that the committed ones equal their build.

    python tools/notebook.py build [NAME ...]   # write notebooks/NAME.ipynb (every notebook by default)
    python tools/notebook.py check              # exit 1 when a committed notebook differs from its build

`notebooks/notebooks.toml` lists the notebooks: each one's source (a `.py` file beside it in notebooks/), the text
that differs between notebooks built from one source, and the pip packages its setup cell installs where the
runtime lacks them. A source is split into cells at the lines that start with '# %%':

    # %% [markdown]                 markdown cell; each line's leading '# ' is removed
    # %%                            code cell
    # %% SETUP                      the setup cell: notebooks/setup_cell.py, with the helpers/ modules this notebook
                                    imports embedded (compressed), shown collapsed in Colab
    # %% [helpers] MODULE: A, B     code cell holding the definitions A and B copied from helpers/MODULE.py: the code
                                    a student studies and edits; the cells below use it, tests keep it equal
                                    (MODULE may name a module of a family package: diffusion/model)

`{{NAME}}` anywhere in a source is replaced by the notebook's text value NAME; `{{BADGE}}` is its Colab badge.
The build refuses a [helpers] cell whose code uses a name that no earlier cell defines or imports.
"""
from __future__ import annotations

import ast
import base64
import builtins
import difflib
import json
import lzma
import re
import symtable
import sys
import tomllib
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
HELPERS = ROOT / "helpers"
MANIFEST = NOTEBOOKS / "notebooks.toml"
SETUP_TEMPLATE = NOTEBOOKS / "setup_cell.py"  # the setup cell of every notebook

# Where the repository is published: the Colab badges point here, and nothing else depends on it.
REPOSITORY = "genimg-notebooks/genimg-notebooks"
BRANCH = "main"

MAX_LINE = 100  # code lines; Colab scrolls longer ones sideways instead of wrapping them
TAUGHT_HEADER = "# Also in helpers/{module}.py: edit this cell and re-run it to try your own version."
SHORT_HEADER = "# Also in helpers/{module}.py: edit this cell and re-run it."  # longer paths
TAUGHT_PATTERN = re.compile(r"^# Also in helpers/([\w/]+)\.py: ")
MARKER = re.compile(r"^# %%(?: (?P<setup>SETUP)| \[(?P<kind>markdown|helpers)\](?P<arg>.*))?\s*$")
IPYTHON_NAMES = {"display", "get_ipython", "In", "Out"}


class BuildError(RuntimeError):
    """A notebook source that cannot be built; the message names the source, the cell and what to change."""


def badge(name: str) -> str:
    """The 'Open in Colab' badge of notebook `name` (markdown)."""
    url = f"https://colab.research.google.com/github/{REPOSITORY}/blob/{BRANCH}/notebooks/{name}.ipynb"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def manifest() -> dict[str, dict]:
    """notebooks.toml: notebook name -> {source, text, packages}."""
    entries = tomllib.loads(MANIFEST.read_text())
    for name, entry in entries.items():
        if not (NOTEBOOKS / entry.get("source", "")).is_file():
            raise BuildError(f"{MANIFEST.name}: [{name}] needs `source`, a file in notebooks/")
    return entries


def split_cells(text: str) -> list[tuple[str, str, str]]:
    """Percent-format text -> [(kind, argument, body)] with kind 'markdown', 'code', 'setup' or 'helpers'."""
    cells: list[tuple[str, str, list[str]]] = []
    for line in text.splitlines():
        match = MARKER.match(line)
        if match:
            kind = "setup" if match["setup"] else match["kind"] or "code"
            cells.append((kind, (match["arg"] or "").strip(), []))
        elif cells:
            cells[-1][2].append(line)
        elif line.strip():
            raise BuildError(f"text before the first '# %%' marker: {line!r}")
    return [(kind, arg, "\n".join(body).strip("\n")) for kind, arg, body in cells]


def markdown_text(body: str) -> str:
    """A markdown cell's text from its commented lines in the source."""
    return "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())


def definitions(module: str, names: list[str]) -> str:
    """The source of top-level definitions (classes, functions, assignments) of helpers/MODULE.py, in the order
    asked, each with its decorators and the comment lines right above it."""
    path = HELPERS / f"{module}.py"
    if not path.is_file():
        raise BuildError(f"helpers/{module}.py does not exist")
    lines = path.read_text().splitlines()
    found: dict[str, tuple[int, int]] = {}
    for node in ast.parse(path.read_text()).body:
        targets = [node.name] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else []
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                targets += [target.id] if isinstance(target, ast.Name) else []
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        while first > 0 and lines[first - 1].lstrip().startswith("#"):
            first -= 1
        for target in targets:
            found[target] = (first, node.end_lineno)
    missing = [n for n in names if n not in found]
    if missing:
        raise BuildError(f"helpers/{module}.py has no top-level definition of {', '.join(missing)}")
    return "\n\n\n".join("\n".join(lines[slice(*found[n])]) for n in names)


def taught_cell(argument: str) -> str:
    """The code of a '# %% [helpers] MODULE: A, B' cell: a header line, then the definitions."""
    module, _, names = argument.partition(":")
    names_list = [n.strip() for n in names.split(",") if n.strip()]
    if not module.strip() or not names_list:
        raise BuildError(f"'# %% [helpers] {argument}' should read '# %% [helpers] MODULE: NAME, NAME'")
    header = TAUGHT_HEADER.format(module=module.strip())
    if len(header) > MAX_LINE:
        header = SHORT_HEADER.format(module=module.strip())
    return header + "\n" + definitions(module.strip(), names_list)


def parse_taught_cell(source: str) -> tuple[str, str] | None:
    """(module, code) of a cell built from a [helpers] marker, else None."""
    header, _, code = source.partition("\n")
    match = TAUGHT_PATTERN.match(header)
    return (match[1], code) if match else None


def python_only(code: str) -> str:
    """Cell code with IPython's magics and shell lines turned into `pass`, so that `ast` can read it."""
    return re.sub(r"^(\s*)[%!].*$", r"\1pass", code, flags=re.MULTILINE)


def bound_names(code: str) -> set[str]:
    """Names a cell binds at its top level (assignments, imports, definitions, loop targets)."""
    table = symtable.symtable(python_only(code), "<cell>", "exec")
    return {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}


def global_names_used(code: str) -> set[str]:
    """Names a cell reads from the notebook's globals: free at its top level or global inside its functions."""
    top = symtable.symtable(python_only(code), "<cell>", "exec")
    used: set[str] = set()

    def walk(table: symtable.SymbolTable) -> None:
        for symbol in table.get_symbols():
            if table is top or table.get_type() == "class":
                if symbol.is_referenced() and not (symbol.is_assigned() or symbol.is_imported()):
                    used.add(symbol.get_name())
            elif symbol.is_global():
                used.add(symbol.get_name())
        for child in table.get_children():
            walk(child)

    walk(top)
    return used - bound_names(code) - set(dir(builtins)) - IPYTHON_NAMES


def helper_imports(code: str, package: str = "") -> set[str]:
    """helpers modules that a piece of code imports ('from helpers import x', 'from helpers.x import', relative
    ones resolved from `package`, the folder under helpers/ of the file that holds the code), as paths under
    helpers/ without '.py': 'metrics', 'diffusion/model'."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(python_only(code))):
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".") if node.module else []
            if node.level:  # inside helpers: from .training import ..., from ..metrics import ...
                base = package.split("/") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
            elif parts and parts[0] == "helpers":
                base, parts = [], parts[1:]
            else:
                continue
            if parts:
                modules.add("/".join(base + parts))
                if (HELPERS.joinpath(*base, *parts)).is_dir():  # from helpers.family import module
                    modules.update("/".join(base + parts + [a.name]) for a in node.names
                                   if HELPERS.joinpath(*base, *parts, f"{a.name}.py").is_file())
            else:
                modules.update("/".join(base + [alias.name]) for alias in node.names)
        elif isinstance(node, ast.Import):
            modules.update(a.name.split(".", 1)[1].replace(".", "/") for a in node.names
                           if a.name.startswith("helpers."))
    return modules


def embedded_modules(codes: list[str]) -> list[str]:
    """The helpers/*.py files a notebook needs: those its cells import, and theirs in turn, plus __init__.py
    (and the __init__.py of each family package they live in)."""
    todo = set().union(*(helper_imports(code) for code in codes))
    needed: set[str] = set()
    while todo:
        module = todo.pop()
        if module in needed:
            continue
        if (HELPERS / module).is_dir():  # a package: its __init__.py
            module = f"{module}/__init__"
        path = HELPERS / f"{module}.py"
        if not path.is_file():
            raise BuildError(f"a cell imports helpers.{module.replace('/', '.')}, but helpers/{module}.py "
                             "does not exist")
        needed.add(module)
        package = module.rpartition("/")[0]
        if package:
            todo.add(f"{package}/__init__")
        todo |= helper_imports(path.read_text(), package) - needed
    return ["__init__.py"] + sorted(f"{m}.py" for m in needed)


def encode_helpers(files: list[str]) -> str:
    """The files as JSON {name: text}, xz-compressed, base64: what the setup cell unpacks."""
    payload = json.dumps({name: (HELPERS / name).read_text() for name in files}, sort_keys=True).encode()
    return base64.b64encode(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME)).decode()


def decode_helpers(encoded: str) -> dict[str, str]:
    """The inverse of `encode_helpers`."""
    return json.loads(lzma.decompress(base64.b64decode(encoded)))


def setup_cell(packages: dict[str, str], files: list[str]) -> str:
    """notebooks/setup_cell.py with this notebook's packages and embedded helpers filled in."""
    encoded = encode_helpers(files)
    width = MAX_LINE - 6
    chunks = "\n".join(f'    "{encoded[i:i + width]}"' for i in range(0, len(encoded), width))
    code = SETUP_TEMPLATE.read_text().rstrip("\n")
    if any("/" in name for name in files):  # a family package: its folder is made before its files
        write = '                (HELPERS_ROOT / "helpers" / name).write_text(text)\n'
        code = code.replace(write, write.replace(".write_text(text)", ".parent.mkdir(exist_ok=True)") + write, 1)
    code = code.replace("PACKAGES = {}", f"PACKAGES = {json.dumps(packages)}", 1)
    return code.replace('HELPERS = ""', f"HELPERS = (\n{chunks}\n)", 1)


def embedded_payload(source: str) -> str:
    """The base64 text of the HELPERS constant of a built setup cell."""
    block = source.split("HELPERS = (\n", 1)[1].split("\n)", 1)[0]
    return "".join(line.strip().strip('"') for line in block.splitlines())


def substitute(text: str, values: dict[str, str], where: str) -> str:
    """Replace {{NAME}} by values[NAME]; an unknown NAME is an error."""
    def value(match: re.Match) -> str:
        if match[1] not in values:
            raise BuildError(f"{where}: {{{{{match[1]}}}}} has no value in {MANIFEST.name} (known: {sorted(values)})")
        return values[match[1]]
    return re.sub(r"\{\{(\w+)\}\}", value, text)


def check_cell(where: str, code: str, defined: set[str]) -> None:
    """A [helpers] cell may only use names that earlier cells bind."""
    missing = sorted(global_names_used(code) - defined)
    if missing:
        raise BuildError(f"{where} uses {', '.join(missing)}, which no earlier cell defines or imports: "
                         "import them in an earlier cell (or add them to the [helpers] marker)")


def build(name: str, entry: dict | None = None) -> nbformat.NotebookNode:
    """The notebook `name` as built from its source (not written)."""
    entry = entry or manifest()[name]
    values = {**entry.get("text", {}), "NOTEBOOK": name, "BADGE": badge(name)}
    source_path = NOTEBOOKS / entry["source"]
    parts = split_cells(substitute(source_path.read_text(), values, source_path.name))
    codes = [taught_cell(arg) if kind == "helpers" else body for kind, arg, body in parts]
    files = embedded_modules([c for (kind, _, _), c in zip(parts, codes) if kind in ("code", "helpers")])
    cells, defined = [], set()
    for index, ((kind, arg, body), code) in enumerate(zip(parts, codes)):
        where = f"{source_path.name}, cell {index} ({kind}{' ' + arg if arg else ''})"
        if kind == "markdown":
            cells.append(nbformat.v4.new_markdown_cell(markdown_text(body)))
            continue
        if kind == "setup":
            code = setup_cell(entry.get("packages", {}), files)
        if kind == "helpers":
            check_cell(where, code, defined)
        try:
            defined |= bound_names(code)
        except SyntaxError as err:
            raise BuildError(f"{where}: {err}") from err
        cell = nbformat.v4.new_code_cell(code)
        if kind == "setup" or code.startswith("#@title"):  # Colab shows a form: the code stays collapsed
            cell.metadata["cellView"] = "form"
            cell.metadata["jupyter"] = {"source_hidden": True}
        cells.append(cell)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}, "accelerator": "GPU",
                   "colab": {"provenance": [], "toc_visible": True}}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:03d}"
    nbformat.validate(nb)
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    """The notebook file's text."""
    return nbformat.writes(nb) + "\n"


def differences(names: list[str] | None = None) -> dict[str, str]:
    """Notebook name -> unified diff (first lines) for every committed notebook that is not its build."""
    entries = manifest()
    out = {}
    for name in names or sorted(entries):
        path = NOTEBOOKS / f"{name}.ipynb"
        built = render(build(name, entries[name]))
        committed = path.read_text() if path.is_file() else ""
        if committed != built:
            diff = difflib.unified_diff(committed.splitlines(), built.splitlines(), "committed", "built", lineterm="")
            out[name] = "\n".join(list(diff)[:40])
    return out


def main(argv: list[str]) -> int:
    """Command line (see the module docstring)."""
    if not argv or argv[0] not in ("build", "check"):
        print(__doc__)
        return 2
    entries = manifest()
    names = argv[1:] or sorted(entries)
    unknown = [n for n in names if n not in entries]
    if unknown:
        print(f"unknown notebook(s) {unknown}; {MANIFEST.name} lists {sorted(entries)}")
        return 2
    if argv[0] == "check":
        diffs = differences(names)
        for name, diff in diffs.items():
            print(f"notebooks/{name}.ipynb is not its build; run `python tools/notebook.py build {name}`\n{diff}")
        return 1 if diffs else 0
    for name in names:
        (NOTEBOOKS / f"{name}.ipynb").write_text(render(build(name, entries[name])))
        print(f"built notebooks/{name}.ipynb")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BuildError as err:
        sys.exit(f"build error: {err}")
