# The two commands of the README. Both set up the environment first (scripts/env.sh).
.PHONY: demo test lint

# A short MAE pretraining run on the bundled dataset (CPU: a few minutes), with plots.
# Running it again replaces the previous demo run (--overwrite); other runs are never replaced.
demo:
	scripts/env.sh fastmim train --method mae --data default --output runs/demo --overwrite

# The whole test suite (Triton kernels through the interpreter on CPU; natively with a GPU).
test:
	scripts/env.sh python -m pytest

lint:
	scripts/env.sh ruff check fastmim tests benchmarks
