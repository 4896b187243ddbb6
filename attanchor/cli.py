"""The `attanchor` command: one entry point, each subcommand owned by its package.

`fit|validate|test` (LightningCLI), `export`, `reproduce` and `recipes` live in attanchor.train;
`data ...` in attanchor.data; `eval|compare|demo|calibrate|visualize` in attanchor.eval. Imports
happen per subcommand so `attanchor data ...` does not pay for Lightning.
"""

from __future__ import annotations

import importlib
import sys

USAGE = """usage: attanchor <command> [args]

commands:
  fit | validate | test   train / evaluate from a recipe (LightningCLI): --config recipes/X.yaml
                          or a shipped recipe's name: --config demo/anchored
  recipes                 list | copy NAME DIR: the recipes shipped with the package
  reproduce               re-run a finished run from its config.yaml and compare metrics,
                          weights and package versions with the original
  export                  write a Hugging Face model directory from a checkpoint
  data                    validate | prepare | show | split data sets
  eval                    anchored generation + POPE/VQA metrics on a checkpoint
  compare                 paired, seeded baseline-vs-anchored runs and a report
  demo                    the built-in two-stage comparison on the scenes world (CPU, minutes)
  calibrate               similarity distribution and the threshold for a target fraction
  visualize               draw anchored words on the image patches they attach to

run `attanchor <command> --help` for a command's options
"""

COMMANDS = {
    "fit": "attanchor.train.cli", "validate": "attanchor.train.cli", "test": "attanchor.train.cli",
    "export": "attanchor.train.export_cmd",
    "reproduce": "attanchor.train.reproduce",
    "recipes": "attanchor.train.recipes_cmd",
    "data": "attanchor.data.cli",
    "eval": "attanchor.eval.cli", "compare": "attanchor.eval.cli", "demo": "attanchor.eval.cli",
    "calibrate": "attanchor.eval.cli", "visualize": "attanchor.eval.cli",
}
# Commands whose module's main() takes the argv *without* the command word.
STRIP_COMMAND = {"data", "export", "reproduce", "recipes"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command = argv[0]
    if command not in COMMANDS:
        print(f"attanchor: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command])
    rest = argv[1:] if command in STRIP_COMMAND else argv
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
