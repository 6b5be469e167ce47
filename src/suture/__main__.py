"""`python -m suture` is the `suture` command, so launchers that run modules work: `torchrun -m suture distill ...`."""

from .cli.app import main

main()
