"""``alpaca-ray dedup``: drop near-duplicate instructions from any Alpaca-format file with Alpaca's rule."""

from __future__ import annotations

import sys

from alpaca_ray.config import config_from_args, make_parser, run_cli
from alpaca_ray.dedup.config import DedupConfig


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(
        "alpaca-ray dedup",
        "Drop each instruction whose ROUGE-L F-measure against an instruction kept before it (or in --against) "
        "is above --threshold, exactly as Stanford Alpaca's generate_instruction.py, at any scale.",
        DedupConfig,
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        from alpaca_ray.dedup.pipeline import run_dedup

        config = config_from_args(DedupConfig, args, section="dedup")
        result = run_dedup(config)
        print(f"kept {result.kept} of {result.total} instructions, dropped {result.dropped} near-duplicates "
              f"(ROUGE-L > {config.threshold}) in {result.seconds:.1f}s -> {config.output}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
