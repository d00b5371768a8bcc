"""ModelScope (modelscope.cn), where the InternLM tutorials load models and datasets from as often as
from the Hugging Face hub: `modelscope://ORG/NAME` in model.path, data.path or `tuner chat`, or plain
`ORG/NAME` ids with TUNER_HUB=modelscope. Downloads go through the `modelscope` package's own snapshot
functions into its cache (~/.cache/modelscope); the folder they return is then read like any local one.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from tuner.errors import TunerError

PREFIX = "modelscope://"


def modelscope_id(path: str) -> str | None:
    """'modelscope://ORG/NAME' -> 'ORG/NAME'; with TUNER_HUB=modelscope also a plain 'ORG/NAME' that is
    not a local path; None for anything else."""
    path = str(path)
    if path.startswith(PREFIX):
        repo = path[len(PREFIX):].strip("/")
        if repo.count("/") != 1:
            raise TunerError(f"{path}: a ModelScope id is modelscope://ORG/NAME")
        return repo
    if (os.environ.get("TUNER_HUB", "").lower() == "modelscope" and path.count("/") == 1
            and not path.startswith((".", "/", "~")) and not Path(path).expanduser().exists()):
        return path
    return None


@functools.lru_cache(maxsize=None)  # one download (or cache check) per id and process: model, tokenizer, config
def download(repo: str, kind: str) -> Path:
    """The local folder of ModelScope model or dataset `repo` (kind 'model' or 'dataset'), downloaded
    into the modelscope cache unless it is there."""
    import importlib

    try:  # (the module, not the function modelscope.hub exports under the same name)
        snapshots = importlib.import_module("modelscope.hub.snapshot_download")
    except ImportError:
        raise TunerError(f"{repo!r} is on ModelScope, which needs the package modelscope",
                         hint="pip install modelscope") from None
    fetch = snapshots.snapshot_download if kind == "model" else snapshots.dataset_snapshot_download
    try:
        return Path(fetch(repo))
    except Exception as e:  # noqa: BLE001 - offline, no such repo, no permission: many types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TunerError(f"could not download the {kind} {repo!r} from ModelScope (offline, or no such {kind}): "
                         f"{first}", hint="download it on a machine with network access and give the local folder"
                         ) from None
