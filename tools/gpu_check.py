"""`make gpu-check`: run every CUDA path of the collection on a CUDA machine without internet, and print one
pass/fail table (notebook x path). Meant for a lent GPU machine; about 10 minutes on one GPU.

    bash tools/gpu_check.sh                    # everything
    bash tools/gpu_check.sh --only 01 04       # some notebooks (and the rows that belong to them)
    python tools/gpu_check.py --execute NB     # (internal) run one notebook's code cells in IPython

What it runs, each row of the table:
  unit        the unit tests of the GPU path (UNIT_TESTS: CUDA graph = eager updates, sync-free L-BFGS, every
              fp16 autocast + GradScaler step, the T4 choices)
  smoke-t4    every notebook in smoke mode on CUDA with a T4's choices forced (EMULATE_T4=1: fp16 autocast,
              GradScaler, no bf16, no TF32)
  rerun       every notebook a second time in the same RUN_DIR (a second Run all resumes or reuses)
  weights     the full-mode loading code of 03/05 (ImageNet VGG19, LPIPS' AlexNet) against random-weight files
              put where torchvision caches the real ones (this machine has no internet)
  bench       `make bench` (experiments/bench.py) at the notebooks' full-mode configurations
It needs no internet: datasets come from DATA_DIR (the offline stand-ins of tools/setup.sh: carry data/), the
text encoder from T2I_TEXT_ENCODER (a random tiny BERT is written when it is unset), weights are random.
A missing package (the Jupyter stack, diffusers, bitsandbytes, torch-fidelity) is named with how to bring it.
Exit status: 0 when every row passed, 1 otherwise, 2 when there is no CUDA device.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# pytest -k: the tests of the GPU path, by the words their names use (CUDA-only ones skip on a CPU)
UNIT_TESTS = "cuda or graphed or never_waits or t4 or float16 or fp16 or autocast or scaler or emulation"
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
NEEDED = {"IPython": "ipython", "nbformat": "nbformat", "diffusers": "diffusers", "peft": "peft",
          "accelerate": "accelerate", "torchmetrics": "torchmetrics", "torch_fidelity": "torch-fidelity",
          "skimage": "scikit-image", "bitsandbytes": "bitsandbytes (06's QLoRA only)"}
WHEELS_HINT = ("bring them as wheels (no internet there): on a machine with pip access, `pip download --no-deps "
               "--only-binary=:all: -d .whl NAME==VERSION` for each, carry .whl, then `pip install --no-index "
               "--no-deps .whl/*.whl`")


def missing_packages() -> list[str]:
    """pip names of the packages the checks import that this Python lacks."""
    return [pip for module, pip in NEEDED.items() if importlib.util.find_spec(module) is None]


def write_random_weights(torch_home: Path) -> list[str]:
    """Random-weight files where torchvision and torch-fidelity cache the real ones, so the full-mode loading
    code runs without a download. Returns what it wrote."""
    import torch
    import torchvision
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in (("vgg19-dcbb9e9d.pth", torchvision.models.vgg19),
                        ("alexnet-owt-7be5be79.pth", torchvision.models.alexnet)):
        if not (checkpoints / name).exists():
            torch.save(build().state_dict(), checkpoints / name)
        written.append(str(checkpoints / name))
    return written


def write_tiny_text_encoder(folder: Path) -> Path:
    """A random tiny BERT with its tokenizer (what 04 and 07 load as T2I_TEXT_ENCODER); its embeddings mean
    nothing: it only lets the code run offline."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    words = "a an the photo of picture red green blue small large circle square triangle star left right top " \
            "bottom flower flowers petals yellow white pink purple with and in on is sneaker shirt dress bag"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words.split()))]
    BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64)
    BertModel(config).save_pretrained(folder)
    return folder


def load_full_mode_weights() -> str:
    """03/05's full-mode loaders on the cached random weights: VGG19 features and LPIPS (AlexNet). torchvision
    checks the AlexNet file's hash, which a random file cannot pass, so the check is switched off here."""
    import torch
    import torch.hub
    from helpers.vgg import load_vgg19_features
    features = load_vgg19_features(pretrained=True).cuda()
    out = features(torch.rand(1, 3, 64, 64, device="cuda"))
    loader = torch.hub.load_state_dict_from_url
    torch.hub.load_state_dict_from_url = lambda *a, **k: loader(*a, **{**k, "check_hash": False})
    import torchvision.models._api as api
    api.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    lpips = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).cuda()
    score = lpips(torch.rand(2, 3, 64, 64, device="cuda"), torch.rand(2, 3, 64, 64, device="cuda"))
    return f"VGG19 features {tuple(out.shape)}, LPIPS {float(score):.3f} (random weights)"


def execute(notebook: Path) -> int:
    """Run the notebook's code cells in one IPython shell, in the notebook's folder; print each cell's time;
    stop at the first failing cell (its traceback is printed)."""
    import nbformat
    from IPython.core.interactiveshell import InteractiveShell
    nb = nbformat.read(notebook, as_version=4)
    os.chdir(notebook.parent)
    shell = InteractiveShell.instance()
    for index, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        start = time.perf_counter()
        result = shell.run_cell(cell.source, silent=False)
        print(f"[gpu-check] cell {index}: {time.perf_counter() - start:.1f} s", flush=True)
        if not result.success:
            print(f"[gpu-check] cell {index} FAILED: {result.error_in_exec or result.error_before_exec!r}")
            return 1
    return 0


def run(row: list, command: list[str], env: dict, log: Path, timeout: float) -> None:
    """Run `command`, append its output to `log`, fill `row` with PASS/FAIL, seconds and the last error line."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        output, ok = done.stdout + done.stderr, done.returncode == 0
    except subprocess.TimeoutExpired as err:
        output, ok = f"{err.stdout or ''}{err.stderr or ''}\nTIMEOUT after {timeout:.0f} s", False
    seconds = time.perf_counter() - start
    with open(log, "a") as f:
        f.write(f"\n===== {' '.join(command)} ({seconds:.0f} s, {'PASS' if ok else 'FAIL'})\n{output}")
    errors = [line for line in output.splitlines() if "Error" in line or "FAILED" in line or "TIMEOUT" in line]
    row += ["PASS" if ok else "FAIL", f"{seconds:.0f}", "" if ok else (errors[-1] if errors else "")[:120]]
    print(f"{row[0]:28s} {row[1]:9s} {row[2]:4s} {row[3]:>5s} s  {row[4]}", flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="notebook numbers or names (default: all)")
    parser.add_argument("--execute", help=argparse.SUPPRESS)
    parser.add_argument("--weights", action="store_true", help=argparse.SUPPRESS)  # the weights row, in a fresh process
    parser.add_argument("--skip", nargs="*", default=[], help="rows to leave out: unit smoke-t4 rerun weights bench")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu-check"))
    parser.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # the unit tests of this tool
    args = parser.parse_args(argv)
    if args.execute:
        return execute(Path(args.execute).resolve())
    if args.weights:
        print(load_full_mode_weights())
        return 0
    import torch
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("no CUDA device: make gpu-check runs the CUDA paths on a machine with an NVIDIA GPU (nvidia-smi shows "
              "it). On this machine run the GPU path on the CPU instead: LEGS=t4 bash tools/test.sh")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu-check.log"
    log.write_text("")
    notebooks = [n for n in NOTEBOOKS if not args.only or any(n.startswith(o) or n == o for o in args.only)]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (--allow-cpu)"
    print(f"gpu-check on {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    missing = missing_packages()
    if missing:
        print(f"missing here: {', '.join(missing)}; the rows that need them fail or skip. To run them, {WHEELS_HINT}")
    env = {**os.environ, "SMOKE": "1", "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", "TORCH_HOME": str(out / "torch"),
           "DATA_DIR": os.environ.get("DATA_DIR", str(ROOT / "data")), "PYTHONPATH": str(ROOT)}
    write_random_weights(Path(env["TORCH_HOME"]))
    if not env.get("T2I_TEXT_ENCODER"):
        env["T2I_TEXT_ENCODER"] = str(write_tiny_text_encoder(out / "tiny-text-encoder"))
    python, rows = sys.executable, []
    print(f"{'notebook':28s} {'path':9s} {'':4s} {'time':>5s}    last error")
    if "unit" not in args.skip:
        rows.append(["all (unit tests)", "unit"])
        run(rows[-1], [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", "-k",
                       UNIT_TESTS], env, log, 300)
    for leg, emulate, folder in (("smoke-t4", "1", "t4"), ("rerun", "1", "t4")):
        if leg in args.skip:
            continue
        for name in notebooks:
            rows.append([name, leg])
            run(rows[-1], [python, __file__, "--execute", str(ROOT / "notebooks" / f"{name}.ipynb")],
                {**env, "EMULATE_T4": emulate, "RUN_DIR": str(out / folder)}, log, 300)
    if "weights" not in args.skip and any(n.startswith(("03", "05")) for n in notebooks):
        rows.append(["03/05 (full-mode weights)", "weights"])
        run(rows[-1], [python, __file__, "--weights"], env, log, 300)
    if "bench" not in args.skip:
        rows.append(["all (make bench)", "bench"])
        run(rows[-1], [python, str(ROOT / "experiments" / "bench.py")], env, log, 420)
    table = ["| notebook | path | result | seconds | last error |", "|---|---|---|---|---|"]
    table += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} |" for r in rows]
    summary = {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "missing": missing, "rows": [dict(zip(("notebook", "path", "result", "seconds", "error"), r))
                                            for r in rows]}
    (out / "gpu-check.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "gpu-check.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    failed = sum(r[2] != "PASS" for r in rows)
    print(f"gpu-check: {len(rows) - failed} of {len(rows)} rows passed; log {log}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
