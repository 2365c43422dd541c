"""The `rlopt` command: thin Typer commands over the library. Importing this module imports no torch.

Each command lives in rlopt_cli/commands/<name>.py and does its heavy imports inside the function, so
`rlopt --help` answers instantly. User errors (`RloptError`) print one line and exit 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import typer

from rlopt_cli.commands import (
    demo,
    eval_cmd,
    fetch_cmd,
    paper_cmd,
    plan_cmd,
    report_cmd,
    sparsity_cmd,
    sweep_cmd,
    train_cmd,
)
from rlopt_cli.commands._common import OneLineUsageErrors

app = typer.Typer(
    name="rlopt",
    help="Study optimizers in RL of LLMs: GRPO/SFT runs, evals, sweeps and update sparsity.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OneLineUsageErrors,
)
app.command("train")(train_cmd.train)
app.command("eval")(eval_cmd.eval_checkpoint)
app.command("demo")(demo.demo)
app.command("sweep")(sweep_cmd.sweep)
app.command("report")(report_cmd.report)
app.command("sparsity")(sparsity_cmd.sparsity)
app.command("paper")(paper_cmd.paper)
app.command("fetch")(fetch_cmd.fetch)
app.command("plan")(plan_cmd.plan)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
