"""The runner of the experiments. `make bench` times each notebook's training step on this machine, the plain
baseline beside the fast path; `ablate` runs an ablation behind a notebook's improved recipe.

    python experiments/bench.py              # every notebook that has a case (experiments/bench_*.py)
    python experiments/bench.py gan style    # some of them
    python experiments/bench.py ablate gan --list      # experiments/ablate_gan.py (01/02), its own arguments after
    python experiments/bench.py ablate t2i --help      # experiments/ablate_t2i.py (04)

Each case module `experiments/bench_<name>.py` has `run(device, reduced) -> list[dict]`: one row per variant, each row
{"notebook", "variant", "baseline": bool, "config": {...}, "ms_per_step", "it_per_s", "peak_memory_mb",
"note"}, measured with `helpers.training.time_per_step` (warm-up first, device synchronised). The baseline row
is the straightforward eager fp32 code a student would write; every other row of the same notebook gets its
speed-up over it. On a CPU the cases use reduced sizes ("reduced": true in the table and the JSON) so that the
whole run ends within 10 minutes; on a GPU they use each notebook's full-mode configuration.
Writes runs/bench.json: date, device, torch version, reduced, rows.
"""
from __future__ import annotations

import datetime
import importlib
import json
import sys
import time
from pathlib import Path

import torch

from helpers.environment import describe_device, pick_device

ROOT = Path(__file__).resolve().parent.parent

CASES = ("gan", "style", "t2i", "pix2pixhd", "sd_lora", "diffusion")  # experiments/bench_<case>.py


def with_speedups(rows: list[dict]) -> list[dict]:
    """Each row's speed-up over the baseline row of its notebook (baseline time / row time)."""
    base = {r["notebook"]: r["ms_per_step"] for r in rows if r.get("baseline")}
    return [{**r, "speedup": base[r["notebook"]] / r["ms_per_step"]
             if r["notebook"] in base and r.get("ms_per_step") else None} for r in rows]


def table(rows: list[dict]) -> str:
    """A markdown table of the rows."""
    lines = ["| notebook | variant | ms / step | steps / s | peak GPU MiB | speed-up | config | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:  # a row without a time is a variant that cannot run here; its note says why
        peak = f"{r['peak_memory_mb']:,.0f}" if r.get("peak_memory_mb") is not None else "–"
        speed = "baseline" if r.get("baseline") else (f"{r['speedup']:.2f}×" if r.get("speedup") else "–")
        config = ", ".join(f"{k} {v}" for k, v in r.get("config", {}).items())
        ms = f"{r['ms_per_step']:.2f}" if r.get("ms_per_step") is not None else "–"
        rate = f"{r['it_per_s']:.1f}" if r.get("it_per_s") is not None else "–"
        lines.append(f"| {r['notebook']} | {r['variant']} | {ms} | {rate} | {peak} | {speed} | {config} "
                     f"| {r.get('note', '')} |")
    return "\n".join(lines)


ABLATIONS = ("gan", "t2i")  # experiments/ablate_<name>.py, each with main(argv)


def main(names: list[str]) -> int:
    """Run the cases, print the table, write runs/bench.json; or `ablate NAME ARGS...`."""
    if names[:1] == ["ablate"]:
        if len(names) < 2 or names[1] not in ABLATIONS:
            print(f"ablate needs one of {list(ABLATIONS)}, then that ablation's own arguments")
            return 2
        return importlib.import_module(f"ablate_{names[1]}").main(names[2:]) or 0
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown case(s) {unknown}; choose from {list(CASES)}")
        return 2
    device = pick_device()
    reduced = device.type != "cuda"
    print(f"device: {describe_device(device)} | torch {torch.__version__}"
          + (" | CPU: reduced sizes, not the notebooks' full-mode configurations" if reduced else ""))
    rows: list[dict] = []
    for name in names or CASES:
        start = time.perf_counter()
        case_rows = importlib.import_module(f"bench_{name}").run(device, reduced)
        rows += case_rows
        print(f"{name}: {len(case_rows)} rows in {time.perf_counter() - start:.0f} s")
    rows = with_speedups(rows)
    print(table(rows))
    record = {"date": datetime.date.today().isoformat(), "device": describe_device(device),
              "torch": torch.__version__, "reduced": reduced, "rows": rows}
    out = ROOT / "runs" / "bench.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
