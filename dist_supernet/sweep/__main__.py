"""The sweep command.

    python -m dist_supernet.sweep model=mlp compression=none,birder optim.lr=1e-3,3e-3
    python -m dist_supernet.sweep --report multirun/2026-11-22_10-00-00   # rewrite the table and plots

The first form is ``python -m dist_supernet.train --multirun <overrides>``: a
Hydra multirun whose launcher (``hydra/launcher=torchrun``, the default in
``conf/train.yaml``) runs every job as a torchrun job and writes the
comparison table and plots into the sweep dir. The second rewrites them from
the job dirs, e.g. after an interrupted sweep.
"""

import sys
from pathlib import Path


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--report"]:
        if len(args) != 2:
            sys.exit("usage: python -m dist_supernet.sweep --report <sweep dir>")
        from dist_supernet.sweep.report import write_report

        for path in write_report(Path(args[1])):
            print(path)
        return
    from dist_supernet.train.__main__ import main as train_main

    # Hydra finds the launcher in the hydra_plugins namespace package; from a checkout it sits beside
    # dist_supernet/, which an editable install made before it existed does not map: put it on the path.
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "hydra_plugins").is_dir() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    if not {"-m", "--multirun"} & set(args):
        sys.argv.insert(1, "--multirun")
    train_main()


if __name__ == "__main__":
    main()
