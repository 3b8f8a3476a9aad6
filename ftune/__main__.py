"""`python -m ftune <command> ...`: the same as the `ftune` command (torchrun -m ftune train ...)."""

from ftune.cli import main

if __name__ == "__main__":
    main()
