"""What a model that does not load tells the user (the hub offline, a missing repository or file)."""

from __future__ import annotations

from pathlib import Path


def model_load_error(name: str, path: str, error: OSError) -> str:
    """One line for ``--model.model_name_or_path name`` (resolved to ``path``) failing with ``error``.

    When the hub cannot be reached (no network, ``HF_HUB_OFFLINE=1``) and the model is not cached,
    transformers says "couldn't connect"; the line then says the run is offline and how to use a
    local folder instead.
    """
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else type(error).__name__
    offline = "couldn't connect" in text.lower() or "offline mode" in text.lower()
    if Path(path).exists() or not offline:
        return f"--model.model_name_or_path {name!r}: {first_line}"
    return (
        f"--model.model_name_or_path {name!r}: the Hugging Face hub is unreachable (offline) and the model "
        f"is not in the local cache. Download it where there is network (hf download {name} --local-dir DIR), "
        "bring DIR here and pass --model.model_name_or_path DIR; or run the offline demo model testbed:tiny"
    )
