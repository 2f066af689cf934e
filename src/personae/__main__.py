"""`python -m personae` (and `torchrun -m personae`): the command line."""

from personae.app.cli import main

if __name__ == "__main__":
    main()
