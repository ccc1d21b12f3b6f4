"""What every ``pipelines`` CLI shares: how library errors become messages and exit codes, the
``--cache MODALITY=PATH`` option, logging set-up and the teardown of a distributed run.

Exit codes, the same in every command: 2 (usage) for a setting that is wrong as given (a
``ValueError`` of a config, naming the flag, an impossible grid point, or a ``--resume`` with
settings other than its checkpoint's); 1 for what is found wrong in the data or while running
(unreadable or missing data, a cache built otherwise, a diverged loss, an OS error).
"""

import logging
from contextlib import contextmanager

import click

from embed import EmbedError
from store import StoreError

from ..errors import GridError, PipelineError, ResumeError


@contextmanager
def cli_errors():
    """Library errors become one line on stderr: exit 1, or 2 for a setting wrong as given."""
    try:
        yield
    except (GridError, ResumeError) as e:  # settings, though found by reading the model or the checkpoint
        raise click.UsageError(str(e)) from None
    except (PipelineError, StoreError, EmbedError, OSError) as e:
        raise click.ClickException(str(e)) from None
    except ValueError as e:  # config validation (FusionConfigError too): the message names the flag
        raise click.UsageError(str(e)) from None


@contextmanager
def distributed_teardown():
    """Destroy the process group when the command ends, as accelerate's ``end_training`` does: left
    to exit with the interpreter, a gloo process may abort in its teardown."""
    try:
        yield
    finally:
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def parse_pairs(values, flag: str = "--cache", example: str = "image=runs/cache", empty_ok: bool = False,
                form: str = "FIELD=PATH") -> dict:
    """``--cache FIELD=PATH`` options (or another ``NAME=VALUE`` flag, of the ``form`` given) -> ``{name: value}``.

    Raises:
        click.UsageError: malformed, or a name given twice.
    """
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name or (not value and not empty_ok):
            raise click.UsageError(f"{flag} {item}: expected {form}, e.g. {flag} {example}")
        if name in out:
            raise click.UsageError(f"{flag} {item}: '{name}' given twice")
        out[name] = value
    return out


def parse_caches(values) -> dict:
    """``--cache MODALITY=PATH`` options -> ``{modality: path}``."""
    return parse_pairs(values)


def setup_logging(level=logging.WARNING) -> None:
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
