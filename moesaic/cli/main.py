"""``moesaic`` command line: one sub-command per job, each a module with ``main(argv)``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

# sub-command -> (module with main(argv), one-line help)
COMMANDS = {
    "train": ("moesaic.cli.train", "train a recipe: language model (default) or vision"),
    "compare": ("moesaic.cli.compare", "train an MoE and its FLOPs-matched dense baseline"),
    "sweep": (
        "moesaic.cli.sweep",
        "MoE vs dense at several sizes and budgets: the compute speed-up curve",
    ),
    "generate": ("moesaic.cli.generate", "sample text from a trained run"),
    "eval": ("moesaic.cli.eval", "validation loss of a trained run"),
    "bench": ("moesaic.cli.bench", "time the MoE layer against a naive loop and a dense FFN"),
    "report": ("moesaic.cli.report", "parameters, FLOPs, energy, routing and plots of a run"),
    "finetune": ("moesaic.cli.finetune", "fine-tune a trained run on a labelled text task"),
    "distill": ("moesaic.cli.distill", "distil a trained run into a shallower student"),
    "upcycle": ("moesaic.cli.upcycle", "turn a trained dense run into an MoE run and train it"),
    "classic": (
        "moesaic.cli.classic",
        "classic mixtures on Fashion-MNIST: mile|mele|hard|specialists",
    ),
    "vision": (
        "moesaic.cli.vision",
        "a trained image run at inference: capacity-curve|probe",
    ),
    "retgen": (
        "moesaic.cli.retgen",
        "question answering grounded in the Python docs (RetGen): train|ask|eval",
    ),
    "extract": ("moesaic.cli.extract", "a task-routed run's sub-network for one task, as a run"),
    "data": ("moesaic.cli.data", "the Debian packages the corpora, datasets and tests read"),
    "skillnet": (
        "moesaic.skillnet.cli",
        "SkillNet on text, image, sound, video, code: train|eval|retrieve",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    listing = "\n".join(f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="moesaic",
        description="Sparse Mixture-of-Experts for PyTorch.",
        epilog=f"commands:\n{listing}\n\nRun 'moesaic COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument(
        "command",
        nargs="?",
        choices=list(COMMANDS),
        metavar="COMMAND",
        help="the job to run (listed below)",
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv[:1])
    if ns.version:
        from moesaic import __version__

        print(f"moesaic {__version__}")
        return 0
    if ns.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[ns.command][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
