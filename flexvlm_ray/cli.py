"""The flexvlm-ray command line: one table of subcommands, each a module of flexvlm_ray.commands.

Exit codes: 0 ok; 1 units failed (or the run stopped before its units ran); 2 bad input
(nothing started, nothing written); 3 the run's rows are stored but an analysis step failed;
4 (`status`) units are pending: none failed, the run is not finished; 130 interrupted (Ctrl-C).

A command's module is imported only when that command runs (or when --help lists it); its heavy
imports (torch, transformers, Ray) stay inside the command's function, so `--help` and `validate`
import none of them.
"""
from __future__ import annotations

import importlib

import click

from flexvlm_ray.commands.common import (EXIT_ANALYSIS, EXIT_BAD_INPUT, EXIT_FAILURES,  # noqa: F401  (documented)
                                         EXIT_INTERRUPTED, EXIT_OK, EXIT_PENDING)

# name -> "module:click command"
COMMANDS: dict[str, str] = {
    "validate": "flexvlm_ray.commands.validate:validate",
    "plan": "flexvlm_ray.commands.plan:plan",
    "launch": "flexvlm_ray.commands.launch:launch",
    "status": "flexvlm_ray.commands.status:status",
    "analyze": "flexvlm_ray.commands.analyze:analyze",
    "report": "flexvlm_ray.commands.report:report",
    "calibrate": "flexvlm_ray.commands.calibrate:calibrate_command",
    "verify-knobs": "flexvlm_ray.commands.verify_knobs:verify_knobs_command",
    "ls": "flexvlm_ray.commands.ls:ls",
    "train-tiny": "flexvlm_ray.commands.tiny:train_tiny",
    "eval-tiny": "flexvlm_ray.commands.tiny:eval_tiny",
    "train-controller": "flexvlm_ray.commands.train_controller:train_controller",
    "controller-study": "flexvlm_ray.commands.controller_study:controller_study",
}


class CommandTable(click.Group):
    """A click group whose subcommands are the rows of ``COMMANDS``, imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, _, attr = COMMANDS[name].partition(":")
        command = getattr(importlib.import_module(module), attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{COMMANDS[name]} is not a click command")
        return command


@click.group(cls=CommandTable, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flexvlm-ray")
def main() -> None:
    """Sweep VLM knobs on Ray GPU workers; measure per-stage latency and quality."""


if __name__ == "__main__":
    main()
