# Shortcuts for the two commands of the README (the scripts work without make).
.PHONY: setup run test
setup:
	bash tools/setup.sh
run:
	bash tools/run.sh
test:
	bash tools/test.sh
