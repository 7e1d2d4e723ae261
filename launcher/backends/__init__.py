"""Backends: everything that differs between ways of running the workers lives here, one module per backend.

Each module (``single.py``: one process, plain PyTorch, the reference; ``deepspeed.py``: ZeRO-2/3 through the
``deepspeed`` CLI; ``fsdp.py``: FSDP2 through ``accelerate launch``) is named as its ``backend.name`` and defines
``BACKEND``, a :class:`launcher.backends.base.BackendKind` that owns:

* launcher side: the worker command and environment, the backend's config checks, its memory-model terms;
* worker side: ``runtime(cfg)``, the :class:`launcher.backends.base.Backend` the training loop drives (build,
  step, save/load);
* offline: ``read_checkpoint(ckpt)``, the reader of its checkpoint layout that the merge uses.

Nothing outside this package branches on the backend's name: it asks :func:`backend_for`. A new backend is one
new module here plus its ``conf/backend/*.yaml``.

This module stays free of launcher imports (the modules above import launcher.config, which asks this registry
for its checks), so every other module can import it at the top.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.backends.base import Backend, BackendKind
    from launcher.config import Config

_NOT_BACKENDS = {"base"}  # every other module of this package is a backend, named as its file


def names() -> list[str]:
    """Every backend: the modules of this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_BACKENDS)


def backend_for(cfg: Config | str) -> BackendKind:
    """The backend ``cfg.backend.name`` (or the given name) names; its module is imported on first use."""
    name = cfg if isinstance(cfg, str) else cfg.backend.name
    if name not in names():
        raise ValueError(f"backend.name={name!r} is not one of {', '.join(names())}.")
    return importlib.import_module(f"{__name__}.{name}").BACKEND


def every_backend() -> list[BackendKind]:
    return [backend_for(n) for n in names()]


def config_problems(cfg: Config) -> list[str]:
    """Problems with the ``backend`` group: an unknown name, or what that backend's own checks find."""
    if cfg.backend.name not in names():
        return [f"backend.name={cfg.backend.name!r} is not one of {', '.join(names())}."]
    return backend_for(cfg).config_problems(cfg)


def make_backend(cfg: Config) -> Backend:
    """The worker-side backend of this run (called once per rank, in the worker)."""
    return backend_for(cfg).runtime(cfg)
