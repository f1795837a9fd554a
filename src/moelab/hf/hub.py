"""A local folder, or a Hugging Face hub name fetched with `huggingface_hub.snapshot_download`.

The hub is asked only when the argument is not a local path: first the local cache, then (after a quick
reachability check, because the hub client retries for a long time offline) the network.
"""

from __future__ import annotations

from pathlib import Path

from moelab.config import MoelabError

# What a conversion or a trace reads: configs, transformers' safetensors (not e.g. Mistral's duplicate
# consolidated.safetensors) and tokenizer files.
PATTERNS = ["*.json", "model*.safetensors", "*.model", "*.txt", "*.tiktoken"]


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def resolve_hf(name_or_path: str | Path, revision: str | None = None) -> Path:
    """The folder holding a transformers checkpoint: the path itself, or the hub snapshot of a name.

    `revision` (a branch, tag or commit; OLMoE's intermediate checkpoints are branches) goes to the hub
    download. For a local folder it names a subfolder holding that revision (a local mirror of a hub
    repo's checkpoints, one folder per revision)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if revision is None:
            return path
        sub = path / revision
        if not (sub / "config.json").is_file():
            raise MoelabError(f"--revision {revision}: {path} is a local folder with no {revision}/config.json "
                              "(a local folder's revisions are its subfolders)")
        return sub
    if path.exists():
        raise MoelabError(f"{path} is a file; give the folder holding config.json and the weights")
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not name:
        raise MoelabError(f"no such folder: {name}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MoelabError(f"{name!r} is not a local folder, and fetching it needs huggingface_hub "
                          "(pip install moelab[hf])") from None
    try:
        return Path(snapshot_download(name, allow_patterns=PATTERNS, local_files_only=True, revision=revision))
    except Exception:
        pass  # not cached: try the network below
    from moelab.data.tokenizer import _hub_reachable

    if not _hub_reachable():
        raise MoelabError(f"{name!r} is not a local folder nor in the Hugging Face cache, and huggingface.co "
                          "cannot be reached (offline?)")
    try:
        return Path(snapshot_download(name, allow_patterns=PATTERNS, revision=revision))
    except Exception as e:
        at = f" at revision {revision!r}" if revision else ""
        raise MoelabError(f"could not fetch {name!r}{at} from the Hugging Face hub: {_first_line(e)}") from None
