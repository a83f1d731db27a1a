"""`python -m qtune …` (and `torchrun -m qtune …`) runs the same command line as `qtune …`."""

from qtune.cli import main

if __name__ == "__main__":
    main(prog_name="qtune")
