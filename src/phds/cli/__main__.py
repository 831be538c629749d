"""`python -m phds.cli ...` (and `accelerate launch -m phds.cli ...`): the same as the `phds` console script."""

from phds.cli import main

if __name__ == "__main__":
    main()
