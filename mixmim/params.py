"""What every stage script shares: the one params loader, and how a stage reports a user's mistake.

A params file is a mapping of sections; a stage names the sections it reads (later ones
override earlier ones). Relative paths in it (dataset roots, a ``sqlite:///`` tracking
store) are relative to the file's folder, which is also where DVC runs the stage; a SQLite
store inside a DVC experiment workspace resolves to the project's own store, and
``MIXMIM_TRACKING_URI`` overrides every pipeline's store (e.g. a tracking server).

:func:`stage_main` turns a user's mistake (an unknown key, a missing dataset root, a corrupt
image, an unreachable tracking store) into one line on stderr and exit status 2; a traceback
is left for bugs.

A leaf of the package (the engine config checker and the standard library only), so the
data-preparation stage depends on nothing of the training code.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .engine.config import ConfigError, from_mapping

__all__ = [
    "TRACKING_URI_ENV", "DatasetRootError", "Params", "TrackingParams", "is_user_error", "load_params", "merged",
    "stage_main",
]

TRACKING_URI_ENV = "MIXMIM_TRACKING_URI"


class DatasetRootError(FileNotFoundError, ValueError):
    """A dataset root named in ``roots`` does not exist."""


@dataclass
class TrackingParams:
    """The ``tracking`` section."""

    uri: str = "sqlite:///mlflow.db"
    experiment: str = "default"
    pipeline: str = "default"
    scale: str = "builtin"


@dataclass
class Params:
    """A loaded params file and where it lives."""

    data: dict[str, Any]
    path: Path

    @property
    def folder(self) -> Path:
        return self.path.resolve().parent

    def get(self, dotted: str) -> Any:
        """``params.get("finetune.datasets.imagenet")``; a missing key names itself and the file."""
        node: Any = self.data
        walked = []
        for part in dotted.split("."):
            walked.append(part)
            if not isinstance(node, Mapping) or part not in node:
                raise ConfigError(f"{self.path}: missing key {'.'.join(walked)!r}")
            node = node[part]
        return node

    def section(self, dotted: str) -> dict[str, Any]:
        value = self.get(dotted)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{self.path}: {dotted} must be a mapping of keys to values, got {value!r}")
        return dict(value)

    def resolve_path(self, value: str) -> str:
        """A path relative to the params file's folder, made absolute."""
        path = Path(value)
        return str(path if path.is_absolute() else (self.folder / path).resolve())

    def resolve_uri(self, uri: str) -> str:
        """``sqlite:///rel.db`` made absolute (relative to this file; inside a DVC experiment
        workspace, to the same place in the project); other URIs unchanged."""
        from .tracking import project_path

        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
            rest, sep, query = uri[len(prefix):].partition("?")
            return prefix + str(project_path(Path(self.resolve_path(rest)))) + sep + query
        return uri

    def tracking(self) -> TrackingParams:
        return from_mapping(TrackingParams, self.section("tracking"), where=f"{self.path}: tracking")

    def tracking_uri(self) -> str:
        """The store this pipeline's runs go to: ``$MIXMIM_TRACKING_URI``, else ``tracking.uri``."""
        return os.environ.get(TRACKING_URI_ENV, "").strip() or self.resolve_uri(self.tracking().uri)

    def dataset_root(self, name: str, must_exist: bool = False) -> str:
        """The absolute root of dataset ``name`` (with ``must_exist``, a missing folder is an error)."""
        root = self.get(f"roots.{name}")
        if not isinstance(root, str) or not root:
            raise ConfigError(f"{self.path}: roots.{name}={root!r}; expected the path of the {name} dataset")
        resolved = self.resolve_path(root)
        if must_exist and not Path(resolved).exists():
            raise DatasetRootError(f"{self.path}: roots.{name}={root!r}: {resolved} does not exist; expected the "
                                   f"{name} dataset in its official layout (see README, 'Pointing at real data')")
        return resolved


def load_params(path: str | os.PathLike[str] = "params.yaml") -> Params:
    """The one params loader of every stage (and of ``mixmim pipeline``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return Params(dict(data), path)


def merged(params: Params, sections: Sequence[str]) -> dict[str, Any]:
    """Later sections override earlier ones (e.g. ``finetune.common`` then ``finetune.datasets.x``)."""
    out: dict[str, Any] = {}
    for name in sections:
        out.update(params.section(name))
    return out


#: Exceptions that mean "the user's input is wrong" when mixmim's own code raised them.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError)
_PACKAGE_DIR = Path(__file__).resolve().parent


def is_user_error(err: BaseException) -> bool:
    """A checked mistake in the user's input: a :class:`ConfigError`, an unusable tracking store, or a
    ValueError / missing file raised deliberately by the suite's own checks (not by a library)."""
    from .tracking import TrackingUnavailableError

    if isinstance(err, (ConfigError, TrackingUnavailableError)):
        return True
    if not isinstance(err, _USER_ERRORS):
        return False
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return False
    raised_in = Path(frames[-1].filename).resolve()
    return _PACKAGE_DIR in raised_in.parents


def stage_main(name: str, run: Callable[[], Any]) -> int:
    """Run a stage; a user's mistake ends it with one line naming the value and exit status 2,
    an interruption with exit status 130. Anything else (a bug) keeps its traceback."""
    try:
        run()
    except KeyboardInterrupt as err:
        print(f"{name}: interrupted ({err or 'Ctrl-C'}); run the stage again to resume", file=sys.stderr)
        return 130
    except Exception as err:
        if not is_user_error(err):
            raise
        message = " ".join(str(err).split())
        print(f"{name}: error: {message}", file=sys.stderr)
        return 2
    return 0
