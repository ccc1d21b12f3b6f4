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


def parse_caches(values) -> dict:
    """``--cache MODALITY=PATH`` options -> ``{modality: path}``.

    Raises:
        click.UsageError: malformed, or a modality given twice.
    """
    caches = {}
    for item in values:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.UsageError(f"--cache {item}: expected MODALITY=PATH, e.g. --cache image=runs/cache")
        if name in caches:
            raise click.UsageError(f"--cache {item}: modality '{name}' given twice")
        caches[name] = path
    return caches


def setup_logging(level=logging.WARNING) -> None:
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
