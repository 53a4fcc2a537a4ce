"""`python -m preftune ...` (also the form `accelerate launch -m preftune` uses)."""

from preftune.cli.main import main

if __name__ == "__main__":
    main()
