"""The one command line: `mfllm --help` lists the pipeline's commands.

data -> simulate -> export / evaluate / compare; train; bench; forecast / intervene; serve.
User mistakes print one clear line and exit non-zero; no tracebacks.
"""

# Each part of the pipeline owns its commands in its own module (cli/<part>.py); this module only mounts them.

from __future__ import annotations

import typer

from mfllm.cli.bench import bench_app
from mfllm.cli.data import data_app
from mfllm.cli.evaluate import compare_command, evaluate_command, marginal_command
from mfllm.cli.serve import serve_command
from mfllm.cli.simulate import export_command, simulate_command
from mfllm.cli.train import train_app
from mfllm.cli.whatif import forecast_command, intervene_command

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

app.command("simulate")(simulate_command)
app.command("export")(export_command)
app.command("evaluate")(evaluate_command)
app.command("compare")(compare_command)
app.command("marginal")(marginal_command)
app.command("forecast")(forecast_command)
app.command("intervene")(intervene_command)
app.command("serve")(serve_command)
app.add_typer(data_app, name="data", help="Inspect and convert event data (CED, Rumdect, generic JSONL).")
app.add_typer(train_app, name="train", help="Train mfllm-mini; IB-Tune the mean-field model and the policy.")
app.add_typer(bench_app, name="bench", help="Benchmarks that print numbers (fidelity, throughput, model).")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
