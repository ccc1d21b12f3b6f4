"""``python -m embed`` / ``accelerate launch -m embed``: the embed CLI."""

from .cli import main

if __name__ == "__main__":
    main()
