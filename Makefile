# Shortcuts for the README's commands (the scripts work without make).
.PHONY: setup run test bench gpu-check notebooks
setup:
	bash tools/setup.sh
run:
	bash tools/run.sh
test:
	bash tools/test.sh
bench: setup
	.venv/bin/python experiments/bench.py
gpu-check:
	bash tools/gpu_check.sh
notebooks:
	.venv/bin/python tools/notebook.py build
