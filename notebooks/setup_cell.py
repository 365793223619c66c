#@title Setup: run first (installs what this runtime lacks, then loads `helpers`)
# The same code in every notebook; tools/notebook.py fills in PACKAGES and HELPERS.
# `helpers` comes from the repository when the notebook runs inside a checkout of it, else from
# the copy embedded below: this file alone runs in Colab, from Google Drive or from an e-mail.
PACKAGES = {}  # import name -> pip name, installed only where missing (Colab lacks these)
HELPERS = ""  # the helpers/*.py this notebook imports: JSON {file: text}, xz, base64
import base64, hashlib, importlib, importlib.util, json, lzma  # noqa: E401
import subprocess, sys, tempfile  # noqa: E401
from pathlib import Path

missing = sorted(pip for module, pip in PACKAGES.items()
                 if importlib.util.find_spec(module) is None)
if missing:
    print("installing", ", ".join(missing), "with pip ...")
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        raise RuntimeError(f"pip could not install {', '.join(missing)}:\n{pip.stderr[-1500:]}\n"
                           "Connect the runtime to the internet, or install them by hand "
                           f"(pip install {' '.join(missing)}), then re-run this cell.")
    importlib.invalidate_caches()

HELPERS_ROOT = next((p for p in (Path.cwd(), *Path.cwd().parents)
                     if (p / "helpers" / "__init__.py").is_file()), None)
if HELPERS_ROOT is not None:
    print(f"helpers: from the checkout at {HELPERS_ROOT}")
else:
    files = json.loads(lzma.decompress(base64.b64decode(HELPERS)))
    digest = hashlib.sha256(HELPERS.encode()).hexdigest()[:12]
    for base in (Path.cwd(), Path(tempfile.gettempdir())):
        HELPERS_ROOT = base / ".genimg-helpers" / digest
        try:
            (HELPERS_ROOT / "helpers").mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                (HELPERS_ROOT / "helpers" / name).write_text(text)
            break
        except OSError as err:
            print(f"cannot write the helpers under {base} ({err.strerror}); trying another folder")
    else:
        raise RuntimeError("no writable folder for the helpers: os.chdir to one, re-run this cell")
    print(f"helpers: {len(files)} modules from this notebook, now in {HELPERS_ROOT}")
sys.path.insert(0, str(HELPERS_ROOT))
import helpers  # noqa: E402,F401
