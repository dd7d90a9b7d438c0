"""The console scripts of an installed selfrefine (`pip install -e .`): the four scripts and the pipeline, each
the same `main` as `python train_sft.py ...` with the same one-line errors and exit codes."""

from __future__ import annotations

from .errors import cli_main


def sft() -> None:
    from .recipes.sft import main
    cli_main(main)


def dpo() -> None:
    from .recipes.dpo import main
    cli_main(main)


def sample() -> None:
    from .recipes.sample import main
    cli_main(main)


def evaluate() -> None:
    from .recipes.eval import main
    cli_main(main)


def pipeline() -> None:
    from .pipeline import main
    cli_main(main)


def sweep() -> None:
    from .sweep import main
    cli_main(main)


def study() -> None:
    from .study import main
    cli_main(main)
